import re
import subprocess
import sys


def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "spud", "demo", "--quick", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    m = re.search(r"validation bits/byte: ([\d.]+) at step 0 → ([\d.]+) at step (\d+)", r.stdout)
    assert m, r.stdout[-2000:]
    start, end = float(m.group(1)), float(m.group(2))
    assert end < 0.8 * start  # it visibly learns
    for name in ("config.yaml", "tokenizer.json", "data/manifest.json", "metrics.jsonl"):
        assert (out / name).is_file()
    assert "spud sample" in r.stdout
    # SFT stage: a chat run of its own that learns on held-out conversations, then the chat eval
    m = re.search(r"sft validation loss \(assistant tokens\): ([\d.]+) at step 0 → ([\d.]+) at step (\d+)",
                  r.stdout)
    assert m, r.stdout[-2000:]
    assert float(m.group(2)) < float(m.group(1))
    for name in ("config.yaml", "tokenizer.json", "metrics.jsonl", "sft_data.json"):
        assert (out / "chat" / name).is_file()
    assert list((out / "chat" / "checkpoints").glob("step_*"))
    assert re.search(r"arithmetic exact match \(\d+ held-out questions\): base model \(plain prompt\) "
                     r"[\d.]+% → chat model [\d.]+%", r.stdout)
    assert f"spud chat {out}" in r.stdout and f"spud serve {out}" in r.stdout
    # running the demo again continues the finished run instead of failing or overwriting it
    again = subprocess.run([sys.executable, "-m", "spud", "demo", "--quick", "--out", str(out)],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "validation bits/byte" in again.stdout
    assert "arithmetic exact match" in again.stdout
