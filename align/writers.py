"""Where a run's thumbnails go: one writer per --output_format, chosen once from the Config.

The aligner hands each face's encoded thumbnail to its shard's sink (`Writer.shard(key)`:
`add(output, data)`, then `commit()` before the shard's journal records the batch); it knows
nothing of formats. `output` is the record's name for the face, `<identity>/<stem>[_<i>].png`,
the same in every format (with --split, `<split>/<identity>/...`: the packed files are then
one set per split and one for held_out, in those folders, and a face's key leaves the split
out, face_key).

  folders     OUTPUT_DIR/<output>, each written atomically (align.durable); a batch's folders
              fsync'ed at commit. Nothing to assemble.
  rec         OUTPUT_DIR/train.rec, train.idx, property: MXNet's indexed RecordIO, as
              arcface_torch's MXFaceDataset reads it (rec_frame, rec_payload).
  webdataset  OUTPUT_DIR/faces-000000.tar, ...: tar shards of samples <key>.png|jpg, <key>.cls,
              <key>.json, each at most tar_shard_mb (tar_member).

The packed formats are built in two steps, so that work is still done in shards by any engine,
killed at any moment, and the bytes depend on none of it:
  parts     during the run, each shard's sink appends its thumbnails to a part file of the
            state folder, .align_dataset/parts/<shard>-<random>.part, as entries
            [u32 key length][u64 data length][key, UTF-8][data], little-endian; fsync'ed
            before the journal line that records them. A torn tail (a kill mid-append) was
            never journaled and is ignored; a rerun of the shard starts a part of its own.
  assembly  at the end of the run, faces.jsonl's written faces in input order, each with its
            label (labels: 0..C-1 over the identities with a face written, sorted by name, as
            ImageFolder and im2rec number them): its bytes are found by the 64-bit hash of its
            key (key_hash) in the parts or in the packed files already in OUTPUT_DIR (the last
            finished run's, which name their samples: tar member names, and each rec record's
            id2), copied through temporaries (one sample in memory at a time); once all are
            written, the packed files in place are moved into .align_dataset/previous/ (under
            names of their own: a rerun reads them there), the new ones renamed into place. A
            kill at any moment leaves every face in some file a rerun's assembly reads, which
            writes the same bytes again. The state folder is folded
            away after, so a finished run keeps no parts, and photos added later rebuild the
            files from the old ones and the new parts: the same bytes as one run. (It needs
            the packed files' size again in free space while it runs.)
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import secrets
import struct
import tarfile
import tempfile
from array import array
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from align.durable import TEMP_PREFIX, TEMP_SUFFIX, fsync_dir, write_atomic
from align.splits import top_folders

PARTS = "parts"                                 # in the state folder
PREVIOUS = "previous"                           # ... and the packed files the assembly replaces
REC, IDX, PROPERTY = "train.rec", "train.idx", "property"
TAR_NAME = "faces-{:06d}.tar"
TAR_GLOB = re.compile(r"faces-(\d{6})\.tar")
REC_MAGIC = 0xCED7230A                          # dmlc RecordIO's kMagic
_MAGIC = struct.pack("<I", REC_MAGIC)
_LENGTH = (1 << 29) - 1                         # the length bits of a RecordIO length word
IR_HEADER = struct.Struct("<IfQQ")              # MXNet's IRHeader: flag, label, id, id2 (24 bytes)
_ENTRY = struct.Struct("<IQ")                   # a part entry's key length and data length
TAR_BLOCK, TAR_RECORD = 512, 10240              # bytes; a tar ends with 2 zero blocks, padded to a record
COPY_BYTES = 1 << 20                            # buffering of the assembled files, bytes


# --- names -----------------------------------------------------------------------------------------

_NOT_UTF8 = re.compile("[\udc80-\udcff]")       # a byte of a name that is not UTF-8 (surrogateescape)


def sample_key(output: str) -> str:
    """The key of a face in the packed formats: its output name less the extension, with "%"
    and "." written %25 and %2E (WebDataset and Hugging Face split a member's name at the
    first dot of its last component; a key holds none), and each byte of the name that is not
    UTF-8 as %XX (Hugging Face takes keys as UTF-8 text). `Ann.Lee/a.b.png` -> `Ann%2ELee/a%2Eb`."""
    key = output.rsplit(".", 1)[0].replace("%", "%25").replace(".", "%2E")
    return key if key.isascii() else _NOT_UTF8.sub(lambda m: f"%{ord(m.group()) - 0xDC00:02X}", key)


def key_hash(key: str) -> int:
    """64 bits of blake2b of the key, as a signed int64 (numpy's): how the assembly finds a
    face's bytes, and the id2 of its train.rec record (as unsigned)."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def identity_of(output: str) -> str:
    return output.split("/", 1)[0]


def face_key(output: str, split: bool = False) -> str:
    """The key of a face in the packed formats: sample_key of its output, less its top folder
    (its split, or held_out) with --split (`split`): a face keeps its key when its identity
    moves in or out of the splits, and its bytes are found by it in whichever files hold them."""
    return sample_key(output.split("/", 1)[1] if split else output)


def labels_of(identities: Iterable[str]) -> dict[str, int]:
    """{identity: label}: 0..C-1 over the identities (those with a face written), sorted by
    name, as torchvision's ImageFolder and im2rec number the folders layout's classes."""
    return {name: i for i, name in enumerate(sorted(set(identities)))}


# --- MXNet RecordIO ----------------------------------------------------------------------------------

def rec_frame(payload: bytes) -> bytes:
    """One RecordIO record as dmlc-core writes it: the magic word, a length word (cflag in its
    top 3 bits, the length in the other 29), the payload, zeros to a 4-byte boundary. Where the
    payload holds the magic word at a 4-byte-aligned offset, it is cut there, the word
    dropped, into pieces of cflag 1 (first), 2 (middle), 3 (last); a reader joins them with the
    magic word between (so a reader never takes that word for the start of a record)."""
    if len(payload) > _LENGTH:
        raise ValueError(f"a RecordIO record holds at most {_LENGTH} bytes, not {len(payload)}")
    pieces, start = [], 0
    aligned_end = len(payload) & ~3
    i = payload.find(_MAGIC)
    while 0 <= i < aligned_end:
        if i % 4:
            i = payload.find(_MAGIC, i + 1)
            continue
        pieces += [_MAGIC, struct.pack("<I", (1 if start == 0 else 2) << 29 | (i - start)), payload[start:i]]
        start = i + 4
        i = payload.find(_MAGIC, start)
    pieces += [_MAGIC, struct.pack("<I", (3 if start else 0) << 29 | (len(payload) - start)),
               payload[start:], b"\0" * (-len(payload) % 4)]
    return b"".join(pieces)


def rec_unframe(data: bytes) -> tuple[bytes, int]:
    """(payload, bytes used) of the record that starts `data` (rec_frame's inverse)."""
    pieces, pos = [], 0
    while True:
        magic, word = struct.unpack_from("<II", data, pos)
        if magic != REC_MAGIC:
            raise ValueError(f"no RecordIO record at byte {pos}")
        cflag, length = word >> 29, word & _LENGTH
        pieces.append(data[pos + 8:pos + 8 + length])
        pos += 8 + length + (-length % 4)
        if cflag in (0, 3):
            return _MAGIC.join(pieces), pos


def rec_payload(label: int, index: int, key: str, image: bytes) -> bytes:
    """An image record's payload: MXNet's IRHeader (flag 0: one float label; id: the record's
    index; id2: key_hash of its key, unsigned) then the image's bytes."""
    return IR_HEADER.pack(0, float(label), index, key_hash(key) & (2**64 - 1)) + image


def scan_rec(path: Path) -> Iterator[tuple[int, int, int]]:
    """(key hash, byte offset, bytes) of each record of a train.rec (the hash from its id2),
    reading only the headers, up to the first byte that does not start a record."""
    with open(path, "rb") as f:
        size, pos = os.fstat(f.fileno()).st_size, 0
        while pos + 8 + IR_HEADER.size <= size:
            f.seek(pos)
            head = f.read(8 + IR_HEADER.size)
            magic, word = struct.unpack_from("<II", head)
            if magic != REC_MAGIC:
                return
            length = word & _LENGTH
            span = 8 + length + (-length % 4)
            if word >> 29 == 0 and length >= IR_HEADER.size:
                id2 = struct.unpack_from("<q", head, 8 + 16)[0]
            else:                       # cut at a magic word: find its last piece, read it whole
                span = _rec_span(f, pos, size)
                if span is None:
                    return
                f.seek(pos)
                payload = rec_unframe(f.read(span))[0]
                if len(payload) < IR_HEADER.size:
                    return
                id2 = struct.unpack_from("<q", payload, 16)[0]
            if pos + span > size:
                return
            yield id2, pos, span
            pos += span


def _rec_span(f, pos: int, size: int) -> int | None:
    """Bytes of the record at `pos` of the open train.rec `f`, its pieces followed to the last;
    None where the file ends first or holds something else."""
    start = pos
    while pos + 8 <= size:
        f.seek(pos)
        magic, word = struct.unpack("<II", f.read(8))
        if magic != REC_MAGIC:
            return None
        length = word & _LENGTH
        pos += 8 + length + (-length % 4)
        if word >> 29 in (0, 3):
            return pos - start if pos <= size else None
    return None


# --- tar -------------------------------------------------------------------------------------------

def tar_member(name: str, data: bytes) -> bytes:
    """A regular file's tar member with fixed metadata (mode 0644, uid and gid 0, no user or
    group name, mtime 0): a POSIX ustar header, preceded by a pax header only where the name
    needs one (over 100 bytes, or not ASCII), then the data, zeros to a 512-byte block."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime, info.uid, info.gid, info.uname, info.gname = \
        len(data), 0o644, 0, 0, 0, "", ""
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape") + data + b"\0" * (-len(data) % TAR_BLOCK)


def scan_tar(path: Path, extension: str) -> Iterator[tuple[int, int, int]]:
    """(key hash, byte offset, bytes) of each image member (`<key><extension>`) of a tar;
    stops at the first member that cannot be read."""
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(extension):
                    yield key_hash(member.name[:-len(extension)]), member.offset_data, member.size
    except (tarfile.TarError, OSError):
        return


def tar_shards(output_dir: Path) -> list[Path]:
    """The WebDataset shards at the top of OUTPUT_DIR, by number."""
    try:
        names = sorted(n for n in os.listdir(output_dir) if TAR_GLOB.fullmatch(n))
    except FileNotFoundError:
        return []
    return [output_dir / n for n in names]


# --- parts -----------------------------------------------------------------------------------------

def scan_part(path: Path) -> Iterator[tuple[int, int, int]]:
    """(key hash, byte offset, bytes) of each complete entry of a part file."""
    with open(path, "rb") as f:
        size, pos = os.fstat(f.fileno()).st_size, 0
        while pos + _ENTRY.size <= size:
            f.seek(pos)
            key_length, length = _ENTRY.unpack(f.read(_ENTRY.size))
            start = pos + _ENTRY.size + key_length
            if key_length > 4096 or start + length > size:
                return
            yield key_hash(f.read(key_length).decode("utf-8", "surrogateescape")), start, length
            pos = start + length


class FolderSink:
    """A shard's thumbnails as files of OUTPUT_DIR; commit fsyncs the folders they went to."""

    def __init__(self, output_dir: Path):
        self.output_dir, self.folders = output_dir, set()

    def add(self, output: str, data: bytes) -> None:
        path = self.output_dir / output
        write_atomic(path, data)
        self.folders.add(path.parent)

    def commit(self) -> None:
        for folder in self.folders:
            fsync_dir(folder)
        self.folders.clear()

    def close(self) -> None:
        pass


class PartSink:
    """A shard's thumbnails appended to a part file of its own (see the module docstring),
    made on the first add; commit fsyncs it. A failed add is cut off the file again (or, where
    even that fails, the next add starts another part), so every entry before it stays readable."""

    def __init__(self, parts: Path, shard_key: str, split: bool = False):
        self.parts, self.shard_key, self.fd, self.size = parts, shard_key, None, 0
        self.split = split          # outputs under a top folder (--split): keys without it

    def add(self, output: str, data: bytes) -> None:
        if self.fd is None:
            if not self.parts.is_dir():
                self.parts.mkdir(parents=True, exist_ok=True)
                fsync_dir(self.parts.parent)
            self.fd, _ = tempfile.mkstemp(dir=self.parts, prefix=f"{self.shard_key}-", suffix=".part")
            self.size = 0
            fsync_dir(self.parts)       # its name is durable before any journal line needs it
        key = face_key(output, self.split).encode("utf-8", "surrogateescape")
        entry = _ENTRY.pack(len(key), len(data)) + key + data
        try:
            view = memoryview(entry)
            while view:
                view = view[os.write(self.fd, view):]
        except BaseException:
            try:
                os.ftruncate(self.fd, self.size)
                os.lseek(self.fd, self.size, os.SEEK_SET)
            except OSError:
                self.close()
            raise
        self.size += len(entry)

    def commit(self) -> None:
        if self.fd is not None:
            os.fsync(self.fd)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# --- where the bytes are ---------------------------------------------------------------------------

class Sources:
    """Where each face's bytes lie, by key hash: parts and packed files, 28 bytes a face.
    read(key) -> bytes; close() closes the files."""

    def __init__(self):
        self.paths: list[tuple[Path, bool]] = []        # (path, is a train.rec)
        self._hashes, self._files, self._offsets, self._lengths = array("q"), array("i"), array("q"), array("q")
        self._fds: dict[int, int] = {}

    def add(self, path: Path, entries: Iterable[tuple[int, int, int]], rec: bool = False) -> None:
        number = len(self.paths)
        self.paths.append((path, rec))
        for h, offset, length in entries:
            self._hashes.append(h)
            self._files.append(number)
            self._offsets.append(offset)
            self._lengths.append(length)

    def freeze(self) -> None:
        """Sort the entries by hash, for read(); add() no more."""
        hashes = np.array(self._hashes, np.int64)
        order = np.argsort(hashes, kind="stable")
        self.hashes = hashes[order]
        self.files = np.array(self._files, np.int32)[order]
        self.offsets = np.array(self._offsets, np.int64)[order]
        self.lengths = np.array(self._lengths, np.int64)[order]
        del self._hashes, self._files, self._offsets, self._lengths

    def read(self, key: str) -> bytes | None:
        """The bytes stored for `key`, or None where no source has it."""
        h = key_hash(key)
        i = int(np.searchsorted(self.hashes, h))
        if i >= len(self.hashes) or self.hashes[i] != h:
            return None
        number, offset, length = int(self.files[i]), int(self.offsets[i]), int(self.lengths[i])
        fd = self._fds.get(number)
        if fd is None:
            if len(self._fds) >= 64:
                self.close()
            fd = self._fds[number] = os.open(self.paths[number][0], os.O_RDONLY)
        data = os.pread(fd, length, offset)
        if len(data) != length:
            raise RuntimeError(f"{self.paths[number][0]} changed while it was read")
        if self.paths[number][1]:
            data = rec_unframe(data)[0][IR_HEADER.size:]
        return data

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


# --- the writers ------------------------------------------------------------------------------------

class Writer:
    """The folders layout: thumbnails as files, nothing to assemble."""
    packed = False

    def __init__(self, config, output_dir: Path):
        self.config, self.output_dir = config, Path(output_dir)
        self.extension = config.extension
        # --split: the packed files are in OUTPUT_DIR/<split>/ and held_out/, one set each
        self.tops = top_folders(config.split) if getattr(config, "split", None) else None

    def key(self, output: str) -> str:
        return face_key(output, self.tops is not None)

    def identity(self, output: str) -> str:
        """The identity (output folder name) of a face's output."""
        return output.split("/", 2)[1] if self.tops is not None else identity_of(output)

    def folders(self) -> list[Path]:
        """The folders that hold the packed files: OUTPUT_DIR, or each top folder of --split."""
        return [self.output_dir] if self.tops is None else [self.output_dir / t for t in self.tops]

    @contextlib.contextmanager
    def shard(self, shard_key: str) -> Iterator:
        """The sink of one shard's run: add(output, data), commit(), closed at the end."""
        sink = self._sink(shard_key)
        try:
            yield sink
        finally:
            sink.close()

    def _sink(self, shard_key: str):
        return FolderSink(self.output_dir)

    def files(self) -> list[Path]:
        """The packed files in OUTPUT_DIR now (what --overwrite removes)."""
        return []

    def complete(self) -> bool:
        """Whether OUTPUT_DIR holds every file the format's assembly writes."""
        return True

    def sources(self, state_root: Path | None) -> Sources:
        """Every place a face's bytes are: the parts and the packed files set aside in
        `state_root` (None: none), then the packed files in OUTPUT_DIR."""
        sources = Sources()
        if state_root is not None:
            for path in sorted((state_root / PARTS).glob("*.part")):
                sources.add(path, scan_part(path))
            for path in sorted((state_root / PREVIOUS).glob("*")):
                self._add_packed(sources, path)
        for path in self.files():
            self._add_packed(sources, path)
        sources.freeze()
        return sources

    def _add_packed(self, sources: Sources, path: Path) -> None:
        """The faces of packed file `path` (one of files(), or one set aside), if it holds any."""

    def thumbnails(self, outputs: list[str]) -> dict[str, bytes]:
        """{output: its encoded thumbnail} for the outputs found (the report's)."""
        found = {}
        for output in outputs:
            try:
                found[output] = (self.output_dir / output).read_bytes()
            except OSError:
                pass
        return found

    def assemble(self, state_root: Path, faces: Iterable[tuple[dict, dict]], labels: dict[str, int]) -> None:
        """Write the format's files from `faces` ((record, written entry) in input order)."""

    def describe(self) -> str | None:
        """The files a trainer reads, as its loader takes them (None: the folders)."""
        return None


class _PackedWriter(Writer):
    packed = True

    def _sink(self, shard_key: str):
        return PartSink(self.state_parts, shard_key, self.tops is not None)

    @property
    def state_parts(self) -> Path:
        from align.records import STATE
        return self.output_dir / STATE / PARTS

    def thumbnails(self, outputs: list[str]) -> dict[str, bytes]:
        sources = self.sources(None)
        try:
            found = {o: sources.read(self.key(o)) for o in outputs}
        finally:
            sources.close()
        return {o: data for o, data in found.items() if data is not None}

    def assemble(self, state_root: Path, faces: Iterable[tuple[dict, dict]], labels: dict[str, int]) -> None:
        self.assemble_in(state_root, [(self.output_dir, faces, labels)], empty=True)

    def assemble_in(self, state_root: Path, jobs: list[tuple[Path, Iterable[tuple[dict, dict]], dict[str, int]]],
                    empty: bool = False) -> None:
        """assemble() into several folders (--split: one set of files per top folder), each
        job (folder, its faces, its labels); a job without faces writes no file there unless
        `empty` (then the format's files of no face)."""
        sources = self.sources(state_root)
        temps: list[tuple[Path, Path]] = []         # (temporary, final)
        try:
            for folder, faces, labels in jobs:
                faces = iter(faces)
                first = next(faces, None)
                if first is not None or empty:
                    folder.mkdir(parents=True, exist_ok=True)
                    self._write(itertools.chain([first] if first else [], faces), labels, sources, temps, folder)
        except BaseException:
            for tmp, _ in temps:
                tmp.unlink(missing_ok=True)
            raise
        finally:
            sources.close()
        # the packed files in place now go to the state folder first, under names of their
        # own: whatever a kill interrupts, every face is still in some file a rerun reads
        aside = state_root / PREVIOUS
        aside.mkdir(parents=True, exist_ok=True)
        for path in self.files():
            os.rename(path, aside / f"{secrets.token_hex(8)}-{path.name}")
        fsync_dir(aside)
        for tmp, final in temps:
            os.replace(tmp, final)
        for folder in {final.parent for _, final in temps} | {self.output_dir}:
            fsync_dir(folder)

    def _temporary(self, final: Path, temps: list) -> "_TempFile":
        fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX)
        temps.append((Path(tmp), final))
        os.fchmod(fd, 0o644)
        return _TempFile(fd)

    def _image(self, sources: Sources, key: str) -> bytes:
        data = sources.read(key)
        if data is None:
            from align.engines import JobError
            raise JobError(f"the thumbnail of {key} is in none of {self.output_dir}'s packed files "
                           f"(moved or deleted since its run?): rerun with --overwrite to align again")
        return data


class _TempFile:
    """A temporary being assembled: buffered writes, fsync'ed and closed by finish()."""

    def __init__(self, fd: int):
        self.f = os.fdopen(fd, "wb", COPY_BYTES)
        self.size = 0

    def write(self, data: bytes) -> None:
        self.f.write(data)
        self.size += len(data)

    def finish(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()


class RecWriter(_PackedWriter):
    """train.rec and train.idx (MXNet's indexed RecordIO: record i at the offset that the
    idx's line `i\\t<offset>` gives, i = 0..N-1 in faces.jsonl's order of written faces), and
    property (insightface's `<classes>,<height>,<width>`). No header record 0: every record is
    a face, as im2rec writes them (see README, "Train with arcface_torch")."""

    def files(self) -> list[Path]:
        return [p for folder in self.folders() for p in (folder / n for n in (REC, IDX, PROPERTY)) if p.exists()]

    def complete(self) -> bool:
        if self.tops is None:
            return len(self.files()) == 3
        return all(all((f / n).exists() for n in (REC, IDX, PROPERTY)) for f in self.folders() if f.is_dir())

    def _add_packed(self, sources: Sources, path: Path) -> None:
        if path.name.endswith(REC):
            sources.add(path, scan_rec(path), rec=True)

    def _write(self, faces, labels, sources: Sources, temps: list, folder: Path) -> None:
        rec = self._temporary(folder / REC, temps)
        idx = self._temporary(folder / IDX, temps)
        for index, (_, written) in enumerate(faces):
            key = self.key(written["output"])
            frame = rec_frame(rec_payload(labels[self.identity(written["output"])], index, key,
                                          self._image(sources, key)))
            idx.write(f"{index}\t{rec.size}\n".encode())
            rec.write(frame)
        rec.finish()
        idx.finish()
        size = self.config.image_size
        prop = self._temporary(folder / PROPERTY, temps)
        prop.write(f"{len(labels)},{size},{size}\n".encode())
        prop.finish()

    def describe(self) -> str | None:
        if self.tops is None:
            return REC
        return ", ".join(f"{f.name}/{REC}" for f in self.folders() if (f / REC).exists()) or None


class WebDatasetWriter(_PackedWriter):
    """faces-000000.tar, ...: each sample <key><ext> (the thumbnail), <key>.cls (the label, in
    decimal), <key>.json (sample_json); a shard is closed before the sample that would take it
    past tar_shard_mb (it holds one sample at least)."""

    def files(self) -> list[Path]:
        return [p for folder in self.folders() for p in tar_shards(folder)]

    def complete(self) -> bool:
        for folder in self.folders():
            shards = tar_shards(folder)
            if [p.name for p in shards] != [TAR_NAME.format(i) for i in range(len(shards))]:
                return False
        return True

    def _add_packed(self, sources: Sources, path: Path) -> None:
        if path.name.endswith(".tar"):
            sources.add(path, scan_tar(path, self.extension))

    def _write(self, faces, labels, sources: Sources, temps: list, folder: Path) -> None:
        limit = self.config.tar_shard_mb * 1_000_000
        shard, number = None, 0
        for record, written in faces:
            key = self.key(written["output"])
            label = labels[self.identity(written["output"])]
            sample = b"".join((tar_member(key + self.extension, self._image(sources, key)),
                               tar_member(key + ".cls", str(label).encode()),
                               tar_member(key + ".json", sample_json(record, written, key, label))))
            if shard is not None and shard.size + len(sample) > limit:
                _end_tar(shard)
                shard = None
            if shard is None:
                shard = self._temporary(folder / TAR_NAME.format(number), temps)
                number += 1
            shard.write(sample)
        if shard is not None:
            _end_tar(shard)

    def describe(self) -> str | None:
        described = []
        for folder in self.folders():
            n = len(tar_shards(folder))
            if n:
                top = "" if self.tops is None else f"{folder.name}/"
                described.append(f"{top}faces-{{000000..{n - 1:06d}}}.tar")
        return ", ".join(described) or None


def _end_tar(shard: _TempFile) -> None:
    """Two zero blocks, then zeros to a whole tar record, as tarfile and GNU tar end a tar."""
    end = shard.size + 2 * TAR_BLOCK
    shard.write(b"\0" * (end + (-end % TAR_RECORD) - shard.size))
    shard.finish()


def sample_json(record: dict, written: dict, key: str, label: int) -> bytes:
    """A WebDataset sample's .json: its key and label, the input photo (its identity folder
    and path under INPUT_DIR), the record's output name (these three as _text), and the face: its detection (box,
    score, landmarks: input pixels), crop_box, and with --align arcface the matrix (input
    pixels -> thumbnail pixels) and template."""
    face = record["faces"][written["face"]]
    meta = {"key": key, "label": label, "identity": _text(record["input"].split("/", 1)[0]),
            "input": _text(record["input"]), "output": _text(written["output"]), "face": written["face"],
            "box": face["box"], "score": face["score"], "landmarks": face["landmarks"],
            "crop_box": written["crop_box"]}
    for name in ("matrix", "template"):
        if name in written:
            meta[name] = written[name]
    return json.dumps(meta, separators=(",", ":")).encode()


def _text(name: str) -> str:
    """A file name as UTF-8 text: a byte that is not UTF-8 as `\\xNN` (Hugging Face refuses
    the lone surrogates that stand for such bytes in Python's names)."""
    return name if name.isascii() else name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def make_writer(config, output_dir: Path) -> Writer:
    """The writer of config.output_format."""
    return {"folders": Writer, "rec": RecWriter, "webdataset": WebDatasetWriter}[config.output_format](config, output_dir)


def packed_files(output_dir: Path, tops: Iterable[str] = ("",)) -> list[Path]:
    """Every packed file of any format in OUTPUT_DIR, or in its `tops` folders (--split's: the
    splits and held_out; what --overwrite removes)."""
    folders = [output_dir / t for t in tops]
    return [f / n for f in folders for n in (REC, IDX, PROPERTY) if (f / n).exists()] + \
        [p for f in folders if f.is_dir() for p in tar_shards(f)]
