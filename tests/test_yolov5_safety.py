"""Loading a yolov5 model never runs code from the file: payloads hidden in every accepted form end in
a named error and their marker file is never created; the restricted reader rebuilds tensors exactly."""

from __future__ import annotations

import collections
import io
import os
import pickle
import subprocess
import zipfile

import pytest
import torch
import yaml
from safetensors.torch import save_file

from slimloop.errors import CheckpointError, UnsafePickleError
from slimloop.model.torch_zip import read_torch_archive
from slimloop.model.yolov5_files import read_yolov5
from slimloop.model.yolov5_import import import_yolov5

YAML = {"nc": 2, "depth_multiple": 0.33, "width_multiple": 0.25, "anchors": 3,
        "backbone": [[-1, 1, "Conv", [64, 6, 2, 2]]], "head": [[[0], 1, "Detect", ["nc", "anchors"]]]}


class System:
    """Pickles as ``os.system(cmd)`` (``posix.system`` on Linux)."""

    def __init__(self, cmd: str):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class Popen:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (subprocess.Popen, (["touch", str(self.marker)],))


def _zip(path, pkl: bytes, storages: dict[str, bytes] | None = None):
    """A torch.save-shaped archive around raw pickle bytes."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", pkl)
        zf.writestr("archive/byteorder", "little")
        for key, data in (storages or {}).items():
            zf.writestr(f"archive/data/{key}", data)
    return path


def _checkpoint_with(payload) -> dict:
    """A train.py-shaped dict with the payload buried in its options."""
    return {"epoch": 3, "model": None, "ema": None, "opt": {"hyp": {"lr0": 0.01, "x": [payload]}}}


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "pwned"
    yield path
    assert not path.exists(), "a payload ran"


def test_full_checkpoint_payloads_are_refused_by_name(tmp_path, marker):
    torch.save(_checkpoint_with(System(f"touch {marker}")), tmp_path / "a.pt")
    with pytest.raises(UnsafePickleError, match=r"a\.pt: refused: the pickle calls posix\.system") as err:
        read_yolov5(tmp_path / "a.pt")
    assert err.value.global_name == "posix.system"
    torch.save(_checkpoint_with(Popen(marker)), tmp_path / "b.pt", pickle_protocol=4)  # STACK_GLOBAL
    with pytest.raises(UnsafePickleError, match=r"subprocess\.Popen"):
        import_yolov5(tmp_path / "b.pt")


def _raw(template: bytes):
    return lambda marker: template.replace(b"{m}", str(marker).encode())


@pytest.mark.parametrize("make, name", [
    (_raw(b"c__builtin__\neval\n(V__import__('os').system('touch {m}')\ntR."), "builtins.eval"),
    (_raw(b"cbuiltins\nexec\n(Vimport os; os.system('touch {m}')\ntR."), "builtins.exec"),
    (_raw(b"cbuiltins\ngetattr\n(c__builtin__\n__import__\n(Vos\ntRVsystem\ntR(Vtouch {m}\ntR."), "builtins.getattr"),
    (_raw(b"ctorch\nload\n(V{m}\ntR."), "torch.load"),
    (lambda marker: pickle.dumps(System(f"touch {marker}"), protocol=4), "posix.system"),  # STACK_GLOBAL
    (lambda marker: pickle.dumps(Popen(marker), protocol=5), "subprocess.Popen"),
])
def test_hand_made_payloads_in_an_archive(tmp_path, marker, make, name):
    with pytest.raises(UnsafePickleError, match=name.replace(".", r"\.")):
        read_torch_archive(_zip(tmp_path / "x.pt", make(marker)))


def test_state_dict_payload_is_refused_by_torch_weights_only(tmp_path, marker):
    torch.save({"model.0.conv.weight": torch.zeros(1), "x": System(f"touch {marker}")}, tmp_path / "w.pt")
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(YAML))
    with pytest.raises(UnsafePickleError, match=r"w\.pt: refused: the pickle calls posix\.system"):
        read_yolov5(tmp_path / "w.pt", tmp_path / "m.yaml")


def test_legacy_and_plain_pickles_are_refused_unread(tmp_path, marker):
    torch.save(_checkpoint_with(System(f"touch {marker}")), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r"legacy\.pt: not a torch zip archive .* it names .*posix\.system"):
        read_yolov5(tmp_path / "legacy.pt")
    (tmp_path / "plain.pt").write_bytes(pickle.dumps(System(f"touch {marker}")))
    with pytest.raises(CheckpointError, match=r"plain\.pt: not a torch zip archive"):
        import_yolov5(tmp_path / "plain.pt")


def test_safetensors_and_yaml_forms(tmp_path, marker):
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(YAML))
    (tmp_path / "w.safetensors").write_bytes(pickle.dumps(System(f"touch {marker}")))  # a pickle in disguise
    with pytest.raises(CheckpointError, match=r"w\.safetensors: not a safetensors file"):
        read_yolov5(tmp_path / "w.safetensors", tmp_path / "m.yaml")
    save_file({"model.0.conv.weight": torch.zeros(4, 3, 6, 6)}, tmp_path / "ok.safetensors")
    (tmp_path / "evil.yaml").write_text(f"nc: 2\nbackbone: !!python/object/apply:os.system ['touch {marker}']\nhead: []\n")
    with pytest.raises(CheckpointError, match=r"evil\.yaml: not a plain YAML model definition"):
        read_yolov5(tmp_path / "ok.safetensors", tmp_path / "evil.yaml")
    with pytest.raises(CheckpointError, match="needs the model's yaml file"):
        read_yolov5(tmp_path / "ok.safetensors")


class _Ref:
    pass


def _tensor_pickle(size, stride, offset=0) -> bytes:
    """``_rebuild_tensor_v2`` on storage '0' (4 floats), pickled as torch does it."""
    ref = _Ref()

    class T:
        def __reduce__(self):
            return (torch._utils._rebuild_tensor_v2, (ref, offset, size, stride, False, collections.OrderedDict()))

    class P(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", 4) if obj is ref else None

    buf = io.BytesIO()
    P(buf, protocol=2).dump({"t": T()})
    return buf.getvalue()


def test_tensor_geometry_is_bounds_checked(tmp_path):
    data = {"0": torch.arange(4, dtype=torch.float32).numpy().tobytes()}
    ok = read_torch_archive(_zip(tmp_path / "ok.pt", _tensor_pickle((2, 2), (1, 2)), data))
    assert torch.equal(ok["t"], torch.tensor([[0.0, 2.0], [1.0, 3.0]]))
    for size, stride, offset in [((1000,), (1,), 0), ((2,), (1,), 3), ((2, 2), (4, 1), 0)]:
        path = _zip(tmp_path / "bad.pt", _tensor_pickle(size, stride, offset), data)
        with pytest.raises(CheckpointError, match="reaches past its storage"):
            read_torch_archive(path)


def test_state_is_set_only_on_stand_ins(tmp_path):
    raw = b"\x80\x02ccollections\nOrderedDict\n)R}X\x06\x00\x00\x00updateK\x01sb."  # BUILD on a real dict
    with pytest.raises(CheckpointError, match="sets the state of a OrderedDict"):
        read_torch_archive(_zip(tmp_path / "b.pt", raw))


def test_archive_tensors_come_back_exactly(tmp_path):
    base = torch.randn(3, 4)
    state = {"a": base, "t": base.t(), "row": base[1], "half": base.half(), "n": torch.tensor(7),
             "p": torch.nn.Parameter(torch.ones(2)), "o": collections.OrderedDict(k={1, 2}), "s": torch.Size([1, 2])}
    torch.save(state, tmp_path / "s.pt")
    got = read_torch_archive(tmp_path / "s.pt")
    for key in ("a", "t", "row", "half", "n", "p"):
        assert got[key].dtype == state[key].dtype and torch.equal(got[key], state[key].detach()), key
    assert got["o"] == {"k": {1, 2}} and got["s"] == (1, 2)
