"""facenet's three MTCNN nets (P-Net, R-Net, O-Net) as Keras models (`facenet_nets.nets`),
and their weights (`facenet_nets.weights`). Importing the package itself loads nothing."""
