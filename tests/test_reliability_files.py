"""Reliability, crafted files: every file an entry point reads back (params, data.yaml, COCO and
canonical JSON, spec files, checkpoints, resume states, metrics, step manifests, deploy.yaml) is
fed deep nesting, huge shapes, wrong types and truncation through the entry point's own ``main()``;
each must end in exit code 1 with ``error: <the file>: ...`` and no traceback, and the files around
must survive.

The numbers these tests prove are collected in docs/reliability.md.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from slimloop.checkpoint import FORMAT, _save_with_digest, save_checkpoint, save_state
from slimloop.model import build_model
from slimloop.model.spec import spec_to_json

ROOT = Path(__file__).resolve().parents[1]
DEEP = "[" * 100_000 + "]" * 100_000
DEEP_YAML = "a: " + "[" * 50_000 + "]" * 50_000 + "\n"
TINY_MODEL = {"base": "n", "width_multiple": 0.125, "depth_multiple": 0.33, "autoanchor": False}
TINY_TRAIN = {"imgsz": 128, "epochs": 1, "batch_size": 8, "workers": 0, "device": "cpu", "val_every": 100}


def json_corpus(valid: object) -> dict[str, bytes]:
    """Crafted versions of the JSON file whose good content is ``valid``."""
    text = json.dumps(valid)
    inner = dict(valid) if isinstance(valid, dict) else {}
    key = next(iter(inner), "x")
    return {
        "deep nesting": DEEP.encode(),
        "deep nesting in a value": json.dumps({**inner, key: json.loads("[" * 900 + "]" * 900)}).encode(),
        "truncated": text[: len(text) // 2].encode(),
        "empty": b"",
        "not UTF-8": b"\xff\xfe\x00junk",
        "a list at the top": json.dumps([valid]).encode(),
        "NaN": text.replace(": 0.", ": NaN, \"x\": 0.", 1).encode() if ": 0." in text else b'{"a": NaN}',
        "a number out of range": json.dumps({**inner, key: 0}).replace(": 0", ": 1e999", 1).encode(),
        "an integer of 5000 digits": json.dumps({**inner, key: 0}).replace(": 0", ": " + "9" * 5000, 1).encode(),
        "wrong types": json.dumps({k: "x" for k in inner} or {"a": "x"}).encode(),
    }


def yaml_corpus(valid: str) -> dict[str, str]:
    """Crafted versions of a YAML file whose good text is ``valid`` (a mapping)."""
    first = next(line for line in valid.splitlines() if line[:1].isalpha() and ":" in line)  # a top-level key
    return {
        "deep nesting": DEEP_YAML,
        "a key twice": valid + first + "\n",
        "syntax error": valid + "oops: [1, 2\n",
        "empty": "",
        "only comments": "# nothing here\n",
        "a list at the top": "- 1\n- 2\n",
        "not UTF-8": "\udcff\udcfe",
        "wrong types": "\n".join(f"{line.split(':')[0]}: [[x]]" for line in valid.splitlines()
                                 if line and not line.startswith(" ") and ":" in line) + "\n",
    }


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8", "surrogateescape"))
    return path


@pytest.fixture
def entry(monkeypatch, capsys, tmp_path):
    """``entry(module, argv)`` runs ``python -m flows.<module> argv`` in this process (through
    ``flows.common.run_entry``, as the command does) from ``tmp_path``; returns (exit code, stderr)."""
    from flows.common import OFFLINE_ENV, run_entry

    for key, value in OFFLINE_ENV.items():  # run_entry sets them; keep them out of later tests
        monkeypatch.setenv(key, os.environ.get(key, value))
    monkeypatch.setenv("SLIMLOOP_CACHE", str(tmp_path / "store"))
    monkeypatch.chdir(tmp_path)

    def run(module: str, argv: list[str]) -> tuple[int, str]:
        main = importlib.import_module(f"flows.{module}").main
        argv = [*argv, "--quiet"] if module not in ("store", "deploy") else argv  # no progress bars on stderr
        with pytest.raises(SystemExit) as info:
            run_entry(lambda: main(argv))
        return info.value.code, capsys.readouterr().err

    return run


def refused(result: tuple[int, str], name: str | Path) -> str:
    """Assert a named error: exit 1, one ``error:`` message naming ``name``, no traceback, bounded."""
    code, err = result
    assert code == 1, err
    assert err.startswith("error: ") and str(name) in err, err[:2000]
    assert "Traceback" not in err and len(err) < 20_000, err[:2000]
    return err


def params_file(folder: Path, **sections) -> Path:
    """A params file: the tiny model and training, no targets, and ``sections`` on top."""
    raw = {"model": TINY_MODEL, "train": TINY_TRAIN, "target": {"gflops_ratio": None, "params_ratio": None},
           "report": {"gallery": 0, "dpi": 50}, "eval": {"latency_runs": 1, "latency_warmup": 0}}
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return write(folder / "params.yaml", yaml.safe_dump(raw))


# ---- params.yaml and deploy.yaml, through every entry point ----------------------------------

ENTRIES = {"prepare": [], "baseline": [], "compress": ["--no-cache"], "control": [], "report": [],
           "transfer": ["--spec", "s.json", "--data", "d", "--out", "o"]}


def test_crafted_params_files_are_named_by_every_entry_point(entry, tmp_path):
    valid = (ROOT / "params.yaml").read_text()
    corpus = yaml_corpus(valid)
    for module, extra in ENTRIES.items():
        for what, text in corpus.items():
            path = write(tmp_path / "p" / f"{module}-{what.replace(' ', '_')}.yaml", text)
            refused(entry(module, ["--params", str(path), *extra]), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]  # nothing written, not even a store
    print(f"cases: {len(corpus) * len(ENTRIES)}")


def test_crafted_deploy_configs_are_named(entry, tmp_path):
    corpus = yaml_corpus((ROOT / "deploy.yaml").read_text())
    for what, text in corpus.items():
        path = write(tmp_path / f"{what.replace(' ', '_')}.yaml", text)
        refused(entry("deploy", ["run-now", "--config", str(path)]), path)
    print(f"cases: {len(corpus)}")


# ---- datasets: data.yaml, COCO JSON, the canonical JSON ----------------------------------------


def test_crafted_dataset_files_are_named_by_prepare(entry, tmp_path, tiny_data):
    from test_coco_import import coco, write_split

    n = 0
    for what, text in yaml_corpus("train: images/train\nval: images/val\nnames: [a, b]\n").items():
        data_yaml = write(tmp_path / "yolo" / what.replace(" ", "_") / "data.yaml", text)
        params = params_file(tmp_path / "yolo" / what.replace(" ", "_"), data={"source": "yolo", "out_dir": "out",
                                                                                "yolo": {"data_yaml": str(data_yaml)}})
        refused(entry("prepare", ["--params", str(params)]), data_yaml)
        n += 1
    for what, data in json_corpus(coco(2)).items():
        folder = tmp_path / "coco" / what.replace(" ", "_")
        train_json, images = write_split(folder, "train", coco(2))
        val_json, val_images = write_split(folder, "val", coco(1))
        write(train_json, data)
        params = params_file(folder, data={"source": "coco", "out_dir": "out", "coco": {
            "train_json": str(train_json), "train_images": str(images), "val_json": str(val_json),
            "val_images": str(val_images)}})
        refused(entry("prepare", ["--params", str(params)]), train_json)
        assert not (tmp_path / "out").exists()
        n += 1
    print(f"cases: {n}")


def test_crafted_canonical_datasets_are_named_by_baseline_and_transfer(entry, tmp_path, tiny_data, tiny_spec):
    valid = json.loads((tiny_data / "train.json").read_text())
    escape = {**valid, "images": [{**valid["images"][0], "file_name": "../../../etc/passwd"}, *valid["images"][1:]]}
    corpus = {**json_corpus(valid), "a file_name outside the image folder": json.dumps(escape).encode(),
              "width not a number": json.dumps({**valid, "images": [{**valid["images"][0], "width": "wide"}]}).encode()}
    spec = write(tmp_path / "spec.json", spec_to_json(tiny_spec))
    for what, data in corpus.items():
        root = tmp_path / "data" / what.replace(" ", "_")
        shutil.copytree(tiny_data, root)
        write(root / "train.json", data)
        params = params_file(root, data={"out_dir": str(root)})
        refused(entry("baseline", ["--params", str(params), "--out", str(root / "run")]), root / "train.json")
        refused(entry("transfer", ["--params", str(params), "--spec", str(spec), "--data", str(root), "--out",
                                   str(root / "t")]), root / "train.json")
    print(f"cases: {2 * len(corpus)}")


# ---- spec files: model.spec (baseline) and --spec (transfer) --------------------------------------


def _spec_cases(tiny_spec) -> dict[str, tuple[str, str]]:
    """(file suffix, text) of crafted spec files."""
    good = json.loads(spec_to_json(tiny_spec))

    def edited(edit: Callable[[dict], None]) -> str:
        spec = json.loads(json.dumps(good))
        edit(spec)
        return json.dumps(spec)

    cases = {f"json {k}": (".json", v.decode("utf-8", "surrogateescape")) for k, v in json_corpus(good).items()}
    cases.update({f"yaml {k}": (".yaml", v) for k, v in yaml_corpus(yaml.safe_dump(good, sort_keys=False)).items()})
    cases.update({
        "a kernel of 20001 (77 GB)": (".json", edited(lambda s: s["layers"][0].update(kernel=20001, padding=10000))),
        "a million channels": (".json", edited(lambda s: s["layers"][1].update(out_chs=10**6))),
        "2.4 G parameters": (".json", edited(lambda s: [s["layers"][i].update(out_chs=16384) for i in (0, 1)])),
        "5000 layers": (".json", edited(lambda s: s.update(layers=s["layers"] * 209))),
        "a layer type that is a list": (".json", edited(lambda s: s["layers"][0].update(type=[]))),
        "a width as text": (".json", edited(lambda s: s["layers"][0].update(out_chs="16"))),
        "a NaN anchor": (".json", edited(lambda s: s["detect"].update(anchors=[[[1e999, 2]] * 3] * 3)).replace(
            "Infinity", "NaN")),
    })
    return cases


def test_crafted_spec_files_are_named_by_baseline_and_transfer(entry, tmp_path, tiny_data, tiny_spec):
    cases = _spec_cases(tiny_spec)
    for what, (suffix, text) in cases.items():
        spec = write(tmp_path / "specs" / f"{what.replace(' ', '_')}{suffix}", text)
        params = params_file(tmp_path, data={"out_dir": str(tiny_data)}, model={"spec": str(spec)})
        refused(entry("baseline", ["--params", str(params), "--out", str(tmp_path / "run")]), spec)
        refused(entry("transfer", ["--params", str(params), "--spec", str(spec), "--data", str(tiny_data),
                                   "--out", str(tmp_path / "t")]), spec)
    assert not (tmp_path / "run" / "last.safetensors").exists() and not (tmp_path / "t").exists()
    print(f"cases: {2 * len(cases)}")


# ---- checkpoints: the baseline the compress stage starts from -----------------------------------


def _raw_checkpoint(header: object, body: bytes = b"") -> bytes:
    text = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return len(text).to_bytes(8, "little") + text + body


def _checkpoint_cases(good: Path, tiny_spec) -> dict[str, bytes]:
    from safetensors.torch import save

    data = good.read_bytes()
    state = build_model(tiny_spec).state_dict()
    spec = json.loads(spec_to_json(tiny_spec))

    def with_spec(edit: Callable[[dict], None], tensors: dict | None = None) -> bytes:
        s = json.loads(json.dumps(spec))
        edit(s)
        return _save_with_digest(tensors or state, {"format": FORMAT, "spec": json.dumps(s), "meta": "{}"})

    def meta(text: str) -> bytes:
        return _save_with_digest(state, {"format": FORMAT, "spec": json.dumps(spec), "meta": text})

    kernel = {**state, "layers.0.conv.weight": torch.zeros(8, 3, 5, 5)}
    return {
        "truncated header": data[:100], "truncated weights": data[: len(data) - 1000], "empty": b"",
        "a header of deep nesting": _raw_checkpoint(DEEP.encode()),
        "a header that is a list": _raw_checkpoint([1, 2]),
        "metadata that is not strings": _raw_checkpoint({"__metadata__": {"spec": [1]}}),
        "a header claiming a 10^12-element tensor": _raw_checkpoint(
            {"w": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 4 * 10**12]}}, b"\0" * 64),
        "a spec of deep nesting": _save_with_digest(state, {"format": FORMAT, "spec": DEEP, "meta": "{}"}),
        "a spec with a kernel of 20001": with_spec(lambda s: s["layers"][0].update(kernel=20001, padding=10000)),
        "a spec with a list for a width": with_spec(lambda s: s["layers"][0].update(out_chs=[16])),
        "provenance of deep nesting": meta(DEEP), "provenance that is a list": meta("[1]"),
        "provenance that is truncated": meta('{"step": '),
        "a kernel the weights do not have (dimension 2)": with_spec(lambda s: None, kernel),
        "an extra tensor": with_spec(lambda s: None, {**state, "evil": torch.zeros(10)}),
        "integer weights": with_spec(lambda s: None, {**state, "layers.0.bn.weight": torch.zeros(8, dtype=torch.int64)}),
        "a pickle": b"\x80\x04\x95" + b"\0" * 64,
        "safetensors without a spec": save(state),
    }


def test_crafted_checkpoints_are_named_by_compress(entry, tmp_path, tiny_data, tiny_spec):
    torch.manual_seed(0)
    good = save_checkpoint(tmp_path / "good.safetensors", build_model(tiny_spec))
    baseline = json.loads((ROOT / "metrics" / "baseline.json").read_text()) | {"imgsz": 128}
    write(tmp_path / "metrics" / "baseline.json", json.dumps(baseline))
    params = params_file(tmp_path, data={"out_dir": str(tiny_data)}, compress={"iterations": 1})
    target = tmp_path / "models" / "baseline" / "best.safetensors"
    cases = _checkpoint_cases(good, tiny_spec)
    for what, data in cases.items():
        write(target, data)
        refused(entry("compress", ["--params", str(params), "--no-cache"]), target.relative_to(tmp_path))
        assert not (tmp_path / "models" / "compressed").exists(), what
    print(f"cases: {len(cases)}")


# ---- training resume states (baseline) ----------------------------------------------------------


def _state(skeleton: str) -> bytes:
    return _save_with_digest({}, {"format": FORMAT + "-state", "skeleton": skeleton})


def test_crafted_resume_states_are_named_by_baseline(entry, tmp_path, tiny_data):
    """Resume states whose checksum is right (anyone can write one) but whose content is not what
    training writes: refused from the structure, before any of it is used."""
    params = params_file(tmp_path, data={"out_dir": str(tiny_data)})
    run = tmp_path / "run"
    cases = {
        "deep nesting": _state(DEEP), "an unhashable dict key": _state('{"__dict__": [[{"__list__": [1]}, 2]]}'),
        "a list at the top": _state('{"__list__": [1, 2]}'), "a bare list": _state("[1, 2]"),
        "a dict where a list belongs": _state('{"__dict__": 5}'), "an unknown node": _state('{"__evil__": 1}'),
        "a tensor that is not stored": _state('{"__tensor__": "nope"}'),
        "not JSON": _state("{'epoch': 1"), "truncated": _state('{"__dict__": [["epoch", 1]]}')[:-30],
        "a number for the whole state": _state("7"),
        "a dict where the optimizer belongs": b"",  # filled below
        "text where weights belong": b"",
    }
    real = {"epoch": 0, "fingerprint": "f", "model": {}, "ema": None, "ema_updates": 0,
            "optimizer": {"state": {}, "param_groups": []}, "scaler": None, "extra": [], "best_fitness": 0.0,
            "best_metrics": "{}", "history": "[]", "torch_rng": torch.get_rng_state()}
    for what, change in [("a dict where the optimizer belongs", {"optimizer": {"x": 1}}),
                         ("text where weights belong", {"model": {"layers.0.conv.weight": "w"}})]:
        save_state(tmp_path / "s.safetensors", {**real, **change})
        cases[what] = (tmp_path / "s.safetensors").read_bytes()
    for what, data in cases.items():
        write(run / "last.state.safetensors", data)
        refused(entry("baseline", ["--params", str(params), "--out", str(run)]), run / "last.state.safetensors")
        assert not (run / "last.safetensors").exists(), what
    print(f"cases: {len(cases)}")


def test_resume_states_that_do_not_fit_the_run_are_named(tmp_path, tiny_data, tiny_spec):
    """States of the right shape and the right fingerprint (a real one, then edited) that do not fit
    the run: each a CheckpointError naming the file, the good state itself resumes."""
    from conftest import TINY_EVAL, tiny_train_params
    from slimloop.checkpoint import load_state
    from slimloop.errors import CheckpointError
    from slimloop.train import seed_everything, train

    def run(out: Path) -> None:
        seed_everything(0)
        train(build_model(tiny_spec), tiny_data, tiny_train_params(epochs=1), TINY_EVAL, out, progress=False)

    run(tmp_path / "a")  # a finished run: resuming it again trains nothing, but checks the whole state
    good = load_state(tmp_path / "a" / "last.state.safetensors")
    last = (tmp_path / "a" / "last.safetensors").read_bytes()
    groups = good["optimizer"]["param_groups"]
    buffers = good["optimizer"]["state"]
    first = next(iter(buffers))
    cases = {
        "a parameter group too few": {"optimizer": {**good["optimizer"], "param_groups": groups[:2]}},
        "a group with fewer parameters": {"optimizer": {**good["optimizer"], "param_groups": [
            {**groups[0], "params": groups[0]["params"][:-1]}, *groups[1:]]}},
        "a learning rate as text": {"optimizer": {**good["optimizer"], "param_groups": [
            {**groups[0], "lr": "fast"}, *groups[1:]]}},
        "a momentum buffer of another shape": {"optimizer": {**good["optimizer"], "state": {
            **buffers, first: {"momentum_buffer": torch.zeros(7, 7)}}}},
        "a buffer for a parameter no group holds": {"optimizer": {**good["optimizer"], "state": {
            **buffers, 10**6: {"momentum_buffer": torch.zeros(1)}}}},
        "an RNG state of floats": {"torch_rng": torch.zeros(10)},
        "a history of deep nesting": {"history": DEEP},
        "a history with text for a number": {"history": json.dumps([{"epoch": "one"}])},
        "weights of another shape": {"model": {**good["model"], "layers.0.conv.weight": torch.zeros(1)}},
        "an extra module the run does not train": {"extra": [{"w": torch.zeros(1)}]},
    }
    for what, change in cases.items():
        out = tmp_path / what.replace(" ", "_")
        shutil.copytree(tmp_path / "a", out)
        save_state(out / "last.state.safetensors", {**good, **change})
        with pytest.raises(CheckpointError, match=re.escape(str(out / "last.state.safetensors"))):
            run(out)
        assert (out / "last.safetensors").read_bytes() == last, what
    run(tmp_path / "a")  # the unedited state resumes (nothing left to train) and changes nothing
    assert (tmp_path / "a" / "last.safetensors").read_bytes() == last
    assert len(cases) == 10


# ---- metrics files other stages read: control, report, compress -----------------------------------

METRICS = ["baseline.json", "final.json", "iterations/iter_1.json", "control.json", "imgsz_sweep.json"]


def test_crafted_metrics_files_are_named_by_report_control_and_compress(entry, tmp_path, tiny_data, tiny_spec):
    n = 0
    params = params_file(tmp_path, data={"out_dir": str(tiny_data)}, compress={"iterations": 1})
    for name in METRICS:
        valid = json.loads((ROOT / "metrics" / name).read_text())
        for what, data in json_corpus(valid).items():
            folder = tmp_path / "m" / f"{name.replace('/', '_')}-{what.replace(' ', '_')}"
            for other in METRICS:
                write(folder / other, (ROOT / "metrics" / other).read_bytes())
            write(folder / name, data)
            refused(entry("report", ["--params", str(params), "--metrics-dir", str(folder), "--out",
                                     str(tmp_path / "reports")]), folder / name)
            n += 1
            if name == "final.json":
                refused(entry("control", ["--params", str(params), "--metrics-dir", str(folder), "--out",
                                          str(tmp_path / "c")]), folder / name)
                n += 1
    save_checkpoint(tmp_path / "models" / "baseline" / "best.safetensors", build_model(tiny_spec))
    for data in json_corpus(json.loads((ROOT / "metrics" / "baseline.json").read_text())).values():
        write(tmp_path / "metrics" / "baseline.json", data)
        refused(entry("compress", ["--params", str(params), "--no-cache"]), Path("metrics", "baseline.json"))
        n += 1
    assert not (tmp_path / "reports").exists() and not (tmp_path / "c").exists()
    print(f"cases: {n}")


# ---- the step store --------------------------------------------------------------------------------


def test_store_prune_names_crafted_reference_files(entry, tmp_path, monkeypatch):
    from slimloop.store.entries import open_store

    open_store(tmp_path / "store")
    n = 0
    for what, data in json_corpus({"checkpoint": "/x"}).items():
        if what in ("wrong types", "a list at the top"):  # any JSON is fine: references are strings anywhere
            continue
        write(tmp_path / "metrics" / "final.json", data)
        refused(entry("store", ["prune", "--dry-run"]), Path("metrics", "final.json"))
        n += 1
    assert (tmp_path / "store" / ".slimloop-store").is_file()
    print(f"cases: {n}")


# ---- output folders whose parent is a file ---------------------------------------------------------


def test_output_under_a_file_is_a_named_error(entry, tmp_path, tiny_data, tiny_spec, monkeypatch):
    blocker = write(tmp_path / "blocker", b"a user's file")
    params = params_file(tmp_path, data={"out_dir": str(tiny_data)})
    refused(entry("baseline", ["--params", str(params), "--out", str(blocker / "run")]), blocker)
    folder = tmp_path / "metrics"
    for name in METRICS:
        write(folder / name, (ROOT / "metrics" / name).read_bytes())
    refused(entry("report", ["--params", str(params), "--metrics-dir", str(folder), "--out",
                             str(blocker / "reports")]), blocker)
    prep = params_file(tmp_path / "p", data={"out_dir": str(blocker / "prepared"),
                                             "synthetic": {"image_size": 64, "train": 1, "val": 1, "test": 0}})
    refused(entry("prepare", ["--params", str(prep)]), blocker)
    prep = params_file(tmp_path / "q", data={"out_dir": str(tmp_path / "prepared"),
                                             "synthetic": {"image_size": 64, "train": 1, "val": 1, "test": 0}})
    refused(entry("prepare", ["--params", str(prep), "--metrics", str(blocker / "data.json")]), blocker)
    monkeypatch.setenv("SLIMLOOP_CACHE", str(blocker / "store"))
    save_checkpoint(tmp_path / "models" / "baseline" / "best.safetensors", build_model(tiny_spec))
    write(tmp_path / "metrics" / "baseline.json", json.dumps(
        json.loads((ROOT / "metrics" / "baseline.json").read_text()) | {"imgsz": 128}))
    refused(entry("compress", ["--params", str(params), "--no-cache"]), blocker)
    assert blocker.read_bytes() == b"a user's file"
