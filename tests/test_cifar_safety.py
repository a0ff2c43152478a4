"""CIFAR-10 batches are pickles, and numpy's own unpickling trusts what a pickle says: a crafted
dtype state gives an object array over attacker bytes, which segfaults once read. The loader builds
no numpy object from the file. Here each crafted batch is loaded in its own process, so a crash
shows as a signal rather than taking pytest down, and must end in a ValueError naming the file;
the real format still loads pixel for pixel."""
from __future__ import annotations

import io
import json
import os
import pickle
import re
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from scoresde.train import data as D

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the crafted batches load in forked processes")


# ---- a small pickle assembler ------------------------------------------------------------------
# Batches are written opcode by opcode, so that each crafted one differs from the genuine layout
# (checked to load, below) in exactly the part under test.


class Op(bytes):
    """Opcodes, written as they are (not as a bytes value)."""


def enc(value) -> bytes:
    """Protocol-3 opcodes that push `value`: an Op as it is, or a plain None, bool, int, str, bytes,
    tuple or list."""
    if isinstance(value, Op):
        return value
    if value is None:
        return b"N"
    if isinstance(value, bool):
        return b"\x88" if value else b"\x89"
    if isinstance(value, int):
        return b"J" + struct.pack("<i", value)
    if isinstance(value, str):
        return b"X" + struct.pack("<I", len(value.encode())) + value.encode()
    if isinstance(value, bytes):
        return b"B" + struct.pack("<I", len(value)) + value
    if isinstance(value, tuple):
        return b"(" + b"".join(map(enc, value)) + b"t"
    if isinstance(value, list):
        return b"](" + b"".join(map(enc, value)) + b"e"
    raise TypeError(value)


def glob(module: str, name: str) -> Op:
    return Op(f"c{module}\n{name}\n".encode())


def call(module: str, name: str, *args) -> Op:
    """module.name(*args), by REDUCE."""
    return Op(glob(module, name) + enc(args) + b"R")


def build(obj, state) -> Op:
    """obj, then BUILD with state (what numpy's __setstate__ receives)."""
    return Op(enc(obj) + enc(state) + b"b")


UINT8_STATE = (3, "|", None, None, None, -1, -1, 0)
NDARRAY = glob("numpy", "ndarray")


def dtype(descr="u1", state=UINT8_STATE) -> Op:
    return build(call("numpy", "dtype", descr, False, True), state)


def array(shape, raw: bytes, descr=dtype(), head=None) -> Op:
    """numpy's protocol 0-4 array: _reconstruct(ndarray, (0,), b'b'), BUILD (1, shape, dtype, False, raw)."""
    head = head if head is not None else call("numpy.core.multiarray", "_reconstruct", NDARRAY, (0,), b"b")
    return build(head, (1, tuple(shape), descr, False, raw))


def frombuffer(raw, descr, shape, order="C") -> Op:
    """numpy's protocol 5 array: _frombuffer(buffer, dtype, shape, order)."""
    return call("numpy._core.numeric", "_frombuffer", raw, descr, tuple(shape), order)


def batch(data, labels=(7,)) -> bytes:
    """A pickled {b'data': data, b'labels': labels}."""
    return b"\x80\x03}(" + enc(b"data") + enc(data) + enc(b"labels") + enc(list(labels)) + b"u."


PIXELS = bytes(range(256)) * 12  # one image
POINTERS = struct.pack("<Q", 0x4141414141414141) * 384  # 3072 bytes that an object array reads as 384 pointers


def _object_array(count: int) -> Op:
    """An object array over POINTERS: numpy builds one from a dtype 'O' whose state clears its flags."""
    return array((count,), POINTERS[:8 * count], dtype("O", (3, "|", None, None, None, -1, -1, 0)))


def _deep_tuple_key() -> bytes:
    """{((...(0,)...),): 0} with a million tuples: hashing the key overflows CPython's C stack."""
    return b"\x80\x02}K\x00" + b"\x85" * 1_000_000 + b"K\x00s."


# name -> (the batch file's bytes, a pattern its error message must hold after the file's name)
CRAFTED = {
    "object dtype as data": (batch(array((1, 384), POINTERS, dtype("O", (3, "|", None, None, None, -1, -1, 0)))),
                             r"'data' should have dtype uint8, got numpy\.dtype\('O'"),
    "object array in labels": (batch(array((1, 3072), PIXELS), labels=[_object_array(1)]),
                               r"'labels' should be a list of 1 ints in 0\.\.9, got item 0 = _reconstruct"),
    "dtype state that marks u1 as holding objects": (
        batch(array((1, 3072), PIXELS, dtype("u1", (3, "|", None, None, None, -1, -1, 1)))),
        r"dtype uint8, got numpy\.dtype\('u1', False, True\) with state \(3, '\|', None, None, None, -1, -1, 1\)"),
    "dtype state with fields": (
        batch(array((1, 3072), PIXELS, dtype("u1", (3, "<", None, ("a",), ("u1", 0), 1, 1, 0)))),
        r"dtype uint8"),
    "dtype built twice": (batch(array((1, 3072), PIXELS, build(dtype(), (3, "|", None, None, None, -1, -1, 63)))),
                          r"UnpicklingError: refusing a second BUILD on numpy\.dtype"),
    "reconstruct of a reconstruct": (
        batch(array((1, 3072), PIXELS, head=call("numpy.core.multiarray", "_reconstruct",
                                                 call("numpy.core.multiarray", "_reconstruct", NDARRAY, (0,), b"b"),
                                                 (0,), b"b"))),
        r"'data' is not an array as numpy pickles one: got _reconstruct\(_reconstruct"),
    "ndarray called (uninitialised memory)": (batch(call("numpy", "ndarray", (1, 3072), dtype())),
                                              r"TypeError: .*not callable"),
    "frombuffer with a float64 dtype": (
        batch(frombuffer(bytes(8 * 3072), dtype("<f8", (3, "<", None, None, None, -1, -1, 0)), (1, 3072))),
        r"'data' should have dtype uint8, got numpy\.dtype\('<f8'"),
    "frombuffer with an object dtype": (
        batch(frombuffer(POINTERS, dtype("O", (3, "|", None, None, None, -1, -1, 0)), (1, 384))),
        r"'data' should have dtype uint8, got numpy\.dtype\('O'"),
    "fewer bytes than the shape": (batch(array((2, 3072), PIXELS)),
                                   r"shape \(N, 3072\) and N \* 3072 bytes, got shape \(2, 3072\) and 3072 bytes"),
    "wrong shape": (batch(array((3072, 1), PIXELS)), r"got shape \(3072, 1\) and 3072 bytes"),
    "labels as text": (batch(array((1, 3072), PIXELS), labels=[b"3"]), r"'labels' .* got item 0 = b'3'"),
    "label out of range": (batch(array((1, 3072), PIXELS), labels=[10]), r"'labels' .* got item 0 = 10"),
    "BUILD on a list": (batch(array((1, 3072), PIXELS), labels=[build([7], "x")]),
                        r"not a readable CIFAR-10 batch \(UnpicklingError: "),
    "deep tuple as a key": (_deep_tuple_key(), r"tuples nested more than 8 deep"),
    "out-of-band buffer": (pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [1]}, protocol=5,
                                        buffer_callback=lambda buffer: False),
                           r"opcode NEXT_BUFFER .* does not occur in CIFAR-10 batches"),
    "os.system": (None, r"refusing to load global os\.system"),  # the fixture writes it: it names a marker file
}


def _system_call(marker) -> bytes:
    return batch(call("os", "system", f"touch {marker}"))


# Loads each folder given in a child of one interpreter (one import of torch, not one per batch):
# a crash ends only that child, and its exit code is then minus the signal's number.
_LOAD_EACH = r"""
import json, os, sys, traceback
from scoresde.train.data import load_data

codes = {}
for folder in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        os.dup2(os.open(folder + ".stderr", os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
        try:
            load_data(folder)
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)
        os._exit(0)
    codes[folder] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
print(json.dumps(codes))
"""


def _plant(folder, content: bytes):
    folder.mkdir(parents=True)
    (folder / "data_batch_1").write_bytes(content)
    return folder


def _cli_train(folder, out) -> subprocess.Popen:
    """`scoresde train --preset cifar10` on `folder`, started (it runs while the loads below do)."""
    return subprocess.Popen([sys.executable, "-m", "scoresde.cli", "train", "--preset", "cifar10", "--device", "cpu",
                             "--set", f"data={folder}", "steps=1", "batch_size=1", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def crafted(tmp_path_factory):
    """Each crafted batch loaded in its own process, and the CLI run on one.

    Returns:
        {"loads": {name: (the batch file, its process's exit code, its stderr)}, "marker": the file
        the os.system payload would create, "cli": (the batch file, exit code, stderr)}.
    """
    root = tmp_path_factory.mktemp("crafted")
    marker = root / "pwned"
    folders = {name: _plant(root / f"batch{i}", content if content is not None else _system_call(marker))
               for i, (name, (content, _)) in enumerate(CRAFTED.items())}
    # the batch that segfaulted the loader before: an object array (over pointer bytes) in 'labels'
    cli_folder = _plant(root / "cli", CRAFTED["object array in labels"][0])
    cli = _cli_train(cli_folder, root / "run")
    run = subprocess.run([sys.executable, "-c", _LOAD_EACH, *map(str, folders.values())], capture_output=True,
                         text=True, timeout=300)
    _, cli_stderr = cli.communicate(timeout=300)
    assert run.returncode == 0, run.stderr
    codes = json.loads(run.stdout)
    loads = {name: (folder / "data_batch_1", codes[str(folder)], (root / f"{folder.name}.stderr").read_text())
             for name, folder in folders.items()}
    return {"loads": loads, "marker": marker, "cli": (cli_folder / "data_batch_1", cli.returncode, cli_stderr)}


@pytest.mark.parametrize("name", list(CRAFTED))
def test_a_crafted_batch_ends_in_a_value_error_naming_the_file(crafted, name):
    path, code, stderr = crafted["loads"][name]
    assert code >= 0, f"{name}: the loading process died of signal {-code}\n{stderr}"
    assert code == 1, f"{name}: exit code {code} (0: it loaded)"
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"ValueError: {str(path)!r}: "), stderr
    assert re.search(CRAFTED[name][1], last), last


def test_a_global_outside_the_list_runs_nothing(crafted):
    path, marker = crafted["loads"]["os.system"][0], crafted["marker"]
    assert not marker.exists()
    pickle.loads(path.read_bytes())  # the payload is real: an ordinary unpickler runs the command
    assert marker.exists()


def test_the_cli_reports_a_crafted_batch_in_one_line(crafted):
    path, code, stderr = crafted["cli"]
    assert code == 2, (code, stderr)  # the CLI's code for a ValueError; a signal would be negative
    assert stderr.startswith(f"scoresde train: error: {str(path)!r}: 'labels' should be a list of 1 ints"), stderr
    assert len(stderr.strip().splitlines()) == 1, stderr


# ---- the real format ----------------------------------------------------------------------------


def _genuine(count: int, rng) -> dict:
    return {b"batch_label": b"training batch 1 of 5", b"labels": [int(v) for v in rng.integers(0, 10, count)],
            b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
            b"filenames": [b"img_%d.png" % i for i in range(count)]}


def _python2_protocol2(raw: bytes, labels) -> bytes:
    """A batch as Python 2's cPickle wrote CIFAR-10: protocol 2, str (SHORT_BINSTRING/BINSTRING) values,
    numpy.core globals and dtype('u1', 0, 1)."""
    def short(s: bytes) -> bytes:
        return b"U" + bytes([len(s)]) + s

    body = (b"cnumpy.core.multiarray\n_reconstruct\nq\x03cnumpy\nndarray\nq\x04K\x00\x85" + short(b"b") + b"\x87R"
            + b"(K\x01M" + struct.pack("<H", len(raw) // 3072) + b"M\x00\x0c\x86cnumpy\ndtype\nq\x06" + short(b"u1")
            + b"K\x00K\x01\x87Rq\x07(K\x03" + short(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89T"
            + struct.pack("<i", len(raw)) + raw + b"tb")
    return (b"\x80\x02}q\x01(" + short(b"data") + b"q\x02" + body + short(b"labels") + b"](" +
            b"".join(b"K" + bytes([v]) for v in labels) + b"e" + short(b"batch_label") + short(b"training batch 1 of 5")
            + short(b"filenames") + b"](" + b"".join(short(b"f%d.png" % i) for i in range(len(labels))) + b"eu.")


def _loads_as(folder, images: np.ndarray, labels) -> None:
    data = D.load_data(str(folder))
    pixels = data.to_data_units(data.x).round().to(torch.uint8).numpy()
    assert np.array_equal(pixels.reshape(len(images), 3072), images)
    assert data.y.tolist() == list(labels)


@pytest.mark.parametrize("protocol", sorted({2, 3, 4, pickle.HIGHEST_PROTOCOL}))
def test_a_genuine_batch_loads_exactly(tmp_path, protocol):
    batch_ = _genuine(5, np.random.default_rng(protocol))
    folder = _plant(tmp_path / "cifar", pickle.dumps(batch_, protocol=protocol))
    _loads_as(folder, batch_[b"data"], batch_[b"labels"])


def test_a_batch_as_python2_wrote_cifar10_loads_exactly(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (3, 3072), dtype=np.uint8)
    folder = _plant(tmp_path / "cifar", _python2_protocol2(images.tobytes(), [9, 0, 4]))
    _loads_as(folder, images, [9, 0, 4])


def test_the_assembled_genuine_batch_loads(tmp_path):
    """The assembler's genuine array, that each crafted batch departs from, is what the loader accepts:
    so each refusal above is for the part changed."""
    image = np.frombuffer(PIXELS, np.uint8)[None]
    _loads_as(_plant(tmp_path / "a", batch(array((1, 3072), PIXELS))), image, [7])
    _loads_as(_plant(tmp_path / "b", batch(frombuffer(PIXELS, dtype(), (1, 3072)))), image, [7])


def test_what_numpy_builds_is_never_built():
    """The unpickler yields inert records in place of numpy's calls; only the checked bytes become an array."""
    blob = pickle.dumps({b"data": np.arange(3072, dtype=np.uint8).reshape(1, 3072) % 251}, protocol=2)
    record = D.RestrictedUnpickler(io.BytesIO(blob), encoding="bytes").load()[b"data"]
    assert not isinstance(record, np.ndarray) and record.call == "_reconstruct"
    assert record.state[2].call == "numpy.dtype" and record.state[2].args == ("u1", False, True)
