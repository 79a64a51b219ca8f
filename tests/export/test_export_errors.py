"""Bad input to `spud export hf|gguf` is a clear error through the CLI, and leaves nothing behind."""

from __future__ import annotations

import shutil

import pytest

from spud.cli import main
from spud.errors import SpudError
from spud.export import hf as hf_mod
from spud.export.hf import export_hf

pytest.importorskip("transformers")


def leftovers(d):
    return [p.name for p in d.iterdir() if p.name.startswith(".")]


def test_run_without_a_complete_checkpoint(run_factory, tmp_path, capsys):
    run = run_factory()
    for ck in (run / "checkpoints").iterdir():
        (ck / "state.json").unlink()  # a checkpoint whose save never finished
    assert main(["export", "hf", str(run), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    # the wording is the checkpoint module's (it may name the damaged files); the export adds none
    assert "no checkpoints found" in err or "no intact checkpoint" in err
    assert not (tmp_path / "out").exists()


def test_chat_export_of_a_run_without_sft(run_factory, tmp_path, capsys):
    run = run_factory()
    assert main(["export", "hf", str(run), str(tmp_path / "out"), "--chat"]) == 2
    err = capsys.readouterr().err
    assert "has no chat model" in err and "spud sft" in err
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force(run_factory, tmp_path, capsys):
    run = run_factory()
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert main(["export", "hf", str(run), str(out)]) == 2
    assert "not empty; pass --force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "user data"
    assert main(["export", "hf", str(run), str(out), "--force"]) == 0
    assert (out / "config.json").is_file() and not (out / "keep.txt").exists()
    assert leftovers(tmp_path) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["export", "hf", str(run), str(empty)]) == 0  # an empty directory is fine


def test_missing_tokenizer(run_factory, tmp_path, capsys):
    run = run_factory()
    (run / "tokenizer.json").unlink()
    assert main(["export", "hf", str(run), str(tmp_path / "out")]) == 2
    assert "tokenizer.json is missing" in capsys.readouterr().err


def test_failure_mid_write_leaves_nothing_and_keeps_the_old_export(run_factory, tmp_path, monkeypatch):
    run = run_factory()
    out = tmp_path / "out"
    export_hf(run, out)
    before = sorted(p.name for p in out.iterdir())

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hf_mod, "write_model_card", disk_full)  # the last file written
    with pytest.raises(OSError):
        export_hf(run, out, force=True)
    assert sorted(p.name for p in out.iterdir()) == before
    assert leftovers(tmp_path) == []
    shutil.rmtree(out)
    with pytest.raises(OSError):
        export_hf(run, out)
    assert not out.exists() and leftovers(tmp_path) == []


def test_unknown_checkpoint_lists_the_available_ones(run_factory, tmp_path):
    run = run_factory()
    with pytest.raises(SpudError, match="no checkpoint '99'; available: step_0000005"):
        export_hf(run, tmp_path / "out", checkpoint="99")


def test_cli_export_and_help(run_factory, tmp_path, capsys):
    run = run_factory(chat=True)
    assert main(["export", "hf", str(run), str(tmp_path / "out"), "--base", "--checkpoint", "5",
                 "--dtype", "bf16", "--max-shard-size", "0.05"]) == 0
    text = capsys.readouterr().out
    assert "Qwen3ForCausalLM" in text and "base model" in text and "bf16" in text  # the default recipe (QK-norm)
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    with pytest.raises(SystemExit):
        main(["export", "hf", str(run), str(tmp_path / "o2"), "--base", "--chat"])


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_sharded_dcp_checkpoint_exports_like_a_single_file_one(run_factory, tmp_path):
    """A checkpoint written by data-parallel training (DCP shards) exports to the same bytes."""
    import json as _json

    import torch

    from spud.export.source import load_source
    from spud.train import checkpoint as ckpt_io

    run = run_factory(tie_embeddings=False)
    export_hf(run, tmp_path / "single")
    src = load_source(run)
    opt = torch.optim.AdamW(src.model.parameters())
    state = {k: v for k, v in src.state.items() if k not in ("step", "files")}
    ckpt_io.save_sharded(run, 9, src.model, opt, state, {}, keep=5, rank=0)
    assert ckpt_io.is_sharded(run / "checkpoints" / "step_0000009")
    export_hf(run, tmp_path / "sharded", checkpoint=9)
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (tmp_path / "single" / name).read_bytes() == (tmp_path / "sharded" / name).read_bytes(), name
    assert _json.loads((tmp_path / "sharded" / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]


@pytest.mark.parametrize("verb", [["export", "hf"], ["export", "gguf"], ["import", "hf"]])
def test_verb_help(verb, capsys):
    with pytest.raises(SystemExit) as e:
        main([*verb, "--help"])
    assert e.value.code == 0
    assert "usage: spud " + " ".join(verb) in capsys.readouterr().out


def test_cli_errors_have_no_traceback(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "spud", "export", "hf", str(tmp_path / "nope"), str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "run directory not found" in r.stderr
