"""One process that owns the device and runs the three nets for every worker (`--device`).

On a machine of many cores and one GPU, the workers do what needs a CPU (decode, pyramid,
crops, NMS, thumbnails, PNG), one core each, and none of them loads a net or touches the
device: each net call goes to this process, which alone holds the nets there. It runs the
calls that every worker has waiting together, concatenated by net and input size, and sends
each worker its own rows back. Inputs and outputs lie in shared memory, one segment per
worker (made by the server, grown on the worker's request); the pipe carries their shapes.

    worker: RemoteNets.rnet(crops) -> its segment, ("rnet", shape) --> server: every call
    waiting, grouped by (net, input size), concatenated -> LocalNets on the device -> each
    worker's rows into its segment, [(offset, shape)] --> worker: copies them out

Each worker pads its R-Net and O-Net rows to align.detect.ROW_MULTIPLE, so a photo's result
does not depend on whose rows shared its call (tested: bitwise the in-process detector's on
TensorFlow).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import signal
import tempfile
import threading
import traceback
from multiprocessing import connection, shared_memory

import numpy as np

from align.detect import MAX_CROPS, MAX_LEVEL_PIXELS, LocalNets
from align.engines import JobError

GPU_MAX_ROWS = 8192                 # R-Net / O-Net rows per call on a GPU (MAX_CROPS on a CPU)
GPU_MAX_LEVEL_PIXELS = 64_000_000   # P-Net level pixels per call on a GPU
START_TIMEOUT_S = 600.0             # for the nets to load and warm up
ALIGN = 64                          # bytes: where outputs start in a segment


class NetsServerError(JobError):
    """The nets server did not start, or died: the message says why."""


def keras_device(device: str) -> str:
    """Keras's name of a --device value: "cpu" -> "cpu:0", "gpu:1" as it is."""
    return device if ":" in device else f"{device}:0"


# --- worker side ---------------------------------------------------------------------------------
class RemoteNets:
    """align.detect.NetCalls answered by the nets server listening at `address`."""

    def __init__(self, address: str):
        self.conn = connection.Client(address, family="AF_UNIX")
        self.segment: shared_memory.SharedMemory | None = None

    def pnet(self, levels):
        return self._call("pnet", levels)

    def rnet(self, crops):
        return self._call("rnet", crops)

    def onet(self, crops):
        return self._call("onet", crops)

    def warm_up(self) -> None:
        """The server warmed its nets up before any worker started."""

    def trace_counts(self) -> dict[str, int]:
        return {}

    def _call(self, net: str, x: np.ndarray) -> tuple[np.ndarray, ...]:
        x = np.ascontiguousarray(x)
        need = 3 * x.nbytes + (1 << 20)        # P-Net's outputs are < 2x its uint8 input
        if self.segment is None or self.segment.size < need:
            self._grow(need)
        np.ndarray(x.shape, x.dtype, self.segment.buf)[...] = x
        self.conn.send((net, x.shape, x.dtype.str))
        reply = self.conn.recv()
        if isinstance(reply, str):
            raise RuntimeError(f"nets server: {reply}")
        return tuple(np.array(np.ndarray(shape, dtype, self.segment.buf, offset))
                     for offset, shape, dtype in reply)

    def _grow(self, size: int) -> None:
        self.conn.send(("grow", 1 << (size - 1).bit_length()))
        name = self.conn.recv()
        if self.segment is not None:
            self.segment.close()
        self.segment = shared_memory.SharedMemory(name)


# --- the server process --------------------------------------------------------------------------
class _Server:
    def __init__(self, nets: LocalNets, listener: connection.Listener, control, level_pixels: int):
        self.nets, self.listener, self.control = nets, listener, control
        self.level_pixels = level_pixels
        self.segments: dict[connection.Connection, shared_memory.SharedMemory | None] = {}
        self.accepted: list[connection.Connection] = []
        self.wake_r, self.wake_w = os.pipe()

    def _accept(self) -> None:
        while True:
            try:
                conn = self.listener.accept()
            except OSError:
                return
            self.accepted.append(conn)
            os.write(self.wake_w, b"x")

    def run(self) -> None:
        threading.Thread(target=self._accept, daemon=True).start()
        try:
            while True:
                ready = connection.wait([self.control, self.wake_r, *self.segments])
                if self.control in ready:
                    return
                if self.wake_r in ready:
                    os.read(self.wake_r, 4096)
                    while self.accepted:
                        self.segments[self.accepted.pop()] = None
                calls = []
                for conn in ready:
                    if conn in self.segments:
                        message = self._receive(conn)
                        if message is not None:
                            calls.append((conn, message))
                self._run(calls)
        finally:
            for conn in list(self.segments):
                self._drop(conn)

    def _receive(self, conn) -> tuple | None:
        """The worker's net call, or None once its other messages are dealt with."""
        try:
            message = conn.recv()
        except (EOFError, OSError):         # the worker is gone
            self._drop(conn)
            return None
        if message[0] == "grow":
            self._free(conn)
            segment = self.segments[conn] = shared_memory.SharedMemory(create=True, size=message[1])
            conn.send(segment.name)
            return None
        return message

    def _free(self, conn) -> None:
        segment = self.segments.get(conn)
        if segment is not None:
            segment.close()
            segment.unlink()
        self.segments[conn] = None

    def _drop(self, conn) -> None:
        self._free(conn)
        del self.segments[conn]
        conn.close()

    def _run(self, calls: list[tuple]) -> None:
        """The calls of one net and input size as one call (P-Net's in calls of at most
        level_pixels), each worker's rows written back into its segment."""
        groups: dict[tuple, list] = {}
        for conn, (net, shape, dtype) in calls:
            groups.setdefault((net, tuple(shape[1:]), dtype), []).append((conn, shape))
        for (net, tail, dtype), members in groups.items():
            if net != "pnet":
                self._run_group(net, dtype, members)
                continue
            chunk, pixels = [], 0
            for conn, shape in members:
                if chunk and pixels + shape[0] * tail[0] * tail[1] > self.level_pixels:
                    self._run_group(net, dtype, chunk)
                    chunk, pixels = [], 0
                chunk.append((conn, shape))
                pixels += shape[0] * tail[0] * tail[1]
            self._run_group(net, dtype, chunk)

    def _run_group(self, net: str, dtype: str, members: list[tuple]) -> None:
        try:
            inputs = [np.ndarray(shape, dtype, self.segments[conn].buf) for conn, shape in members]
            outs = getattr(self.nets, net)(inputs[0] if len(inputs) == 1 else np.concatenate(inputs))
            del inputs
        except Exception as e:
            for conn, _ in members:
                conn.send(f"{type(e).__name__}: {e}")
            return
        row = 0
        for conn, shape in members:
            buf = self.segments[conn].buf
            offset = _aligned(int(np.prod(shape)) * np.dtype(dtype).itemsize)
            reply = []
            for o in outs:
                part = o[row:row + shape[0]]
                if offset + part.nbytes > len(buf):
                    reply = f"outputs of {part.nbytes} bytes do not fit the worker's segment"
                    break
                np.ndarray(part.shape, part.dtype, buf, offset)[...] = part
                reply.append((offset, part.shape, part.dtype.str))
                offset += _aligned(part.nbytes)
            conn.send(reply)
            row += shape[0]


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def _serve(parent: int, address: str, device: str, threads: int, control) -> None:
    """The server process: the nets on `device`, then calls until the parent says stop."""
    from align.engines.local import _die_with_parent
    from align.worker import QuietStderr, configure_threads
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # the parent handles Ctrl-C
    try:
        with QuietStderr():
            configure_threads(threads, 1.0)
            import keras
        with keras.device(keras_device(device)):
            gpu = not device.startswith("cpu")
            nets = LocalNets(max_rows=GPU_MAX_ROWS if gpu else MAX_CROPS)
            nets.warm_up()
            listener = connection.Listener(address, family="AF_UNIX")
            control.send(("ready", keras.backend.backend()))
            _Server(nets, listener, control, GPU_MAX_LEVEL_PIXELS if gpu else MAX_LEVEL_PIXELS).run()
    except Exception:
        try:
            control.send(("error", traceback.format_exc(limit=-3)))
        except OSError:
            pass
    finally:
        os._exit(0)     # no framework teardown: the parent waits for this process


# --- the parent ----------------------------------------------------------------------------------
class NetsServer:
    """The nets server of one run, started by `start` and stopped by `stop`; workers reach it
    at `address` (a Unix socket) with RemoteNets."""

    def __init__(self, device: str, threads: int):
        ctx = mp.get_context("spawn")
        self.folder = tempfile.mkdtemp(prefix="align-nets-")
        self.address = os.path.join(self.folder, "nets")
        self.control, theirs = ctx.Pipe()
        self.process = ctx.Process(target=_serve, name="align_dataset nets server", daemon=True,
                                   args=(os.getpid(), self.address, device, threads, theirs))
        self.process.start()
        theirs.close()
        try:
            if not self.control.poll(START_TIMEOUT_S):
                raise NetsServerError(f"the nets server did not start on {device} in {START_TIMEOUT_S:.0f} s")
            kind, detail = self.control.recv()
        except EOFError:
            self.process.join(5)
            kind, detail = "error", f"it exited with code {self.process.exitcode}"
        except NetsServerError:
            self.stop()
            raise
        if kind == "error":
            self.stop()
            raise NetsServerError(f"--device {device}: the nets server could not start: "
                                  f"{detail.strip().splitlines()[-1]}")
        self.backend = detail

    def stop(self) -> None:
        try:
            self.control.send("stop")
        except OSError:
            pass
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        shutil.rmtree(self.folder, ignore_errors=True)
