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
    # running the demo again continues the finished run instead of failing or overwriting it
    again = subprocess.run([sys.executable, "-m", "spud", "demo", "--quick", "--out", str(out)],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "validation bits/byte" in again.stdout
