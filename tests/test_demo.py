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
    # the chat eval: five held-out splits, base next to chat, and the decontamination check of
    # those questions against the run's own shards and SFT data (built-in data: none overlap)
    for split in ("operands", "templates", "three_digit", "multi_step", "out_of_range"):
        assert re.search(rf"\n  {split} +[^\n]+ +[\d.]+% +[\d.]+%  0/12\n", r.stdout), split
    assert re.search(r"decontamination: 0 of 60 eval examples \(0\.0%\) overlap the training data "
                     r"\(13-gram or arithmetic fact\); scanned [\d,]+ pretraining tokens \+ 2,000 SFT "
                     r"conversations", r.stdout), r.stdout[-3000:]
    assert f"spud chat {out}" in r.stdout and f"spud serve {out}" in r.stdout
    # running the demo again continues the finished run instead of failing or overwriting it;
    # with --rl it adds the RL stage (RUN/rl, reporting held-out pass@1 before and after)
    again = subprocess.run([sys.executable, "-m", "spud", "demo", "--quick", "--rl", "--out", str(out)],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "validation bits/byte" in again.stdout, again.stdout[-3000:] + again.stderr[-3000:]
    assert "decontamination: 0 of 60 eval examples" in again.stdout
    assert re.search(r"rl held-out pass@1 \(greedy, 8 multi-step problems in eval-only wordings\): "
                     r"[\d.]+% at step 0 → [\d.]+% at step 2", again.stdout), again.stdout[-2000:]
    assert list((out / "rl" / "checkpoints").glob("step_0000002")) and f"spud serve {out} --model rl" in again.stdout
