"""Can a vision tower alone learn to read the built-in pictures, and how fast? (docs/vision.md,
"Why the model did not read the pictures".) The tower's tokens (spud.model.vision.VisionTower,
model.vision set with --set key=value) are flattened into linear heads: the number digit by digit
(tens or none, units — as the tokenizer writes numbers) and the count; trained with AdamW on
training-split number and count pictures, scored on 400 held-out ones. No language model, so this
bounds what `spud vlm` can reach with the same pictures.

    python benchmarks/vlm_tower_probe.py --steps 1200 --lr 2e-3 --n 12000 --set vit_stem=conv vit_layers=0

--stem swaps the tower's stem for the variants of the experiment table (the shipped stem is
`--set vit_stem=conv`; `cnn` and `cnnvit` are the prototypes it came from: the same convolutions,
without / with the position embedding and ViT blocks; `conv` a strided 3-conv stem that failed)."""
import sys, time, resource, torch, torch.nn as nn, torch.nn.functional as F
torch.set_num_threads(1)
from spud.config import ModelConfig, VisionConfig
from spud.data import images
from spud.model.vision import VisionTower, load_image
import argparse
ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=300); ap.add_argument("--lr", type=float, default=1e-3)
ap.add_argument("--bs", type=int, default=32); ap.add_argument("--n", type=int, default=6000)
ap.add_argument("--set", nargs="*", default=[]); ap.add_argument("--threads", type=int, default=1); ap.add_argument("--save", default=""); ap.add_argument("--stem", default="linear"); ap.add_argument("--pool", default="flat")
a = ap.parse_args()
torch.set_num_threads(a.threads)
vkw = dict(vit_dim=96, vit_layers=2, vit_heads=4, vit_stem="patch")  # the table's baseline
for s in a.set:
    k, v = s.split("="); vkw[k] = type(getattr(VisionConfig(), k))(v) if not isinstance(getattr(VisionConfig(), k), str) else v
vc = VisionConfig(**vkw)
mc = ModelConfig(vocab_size=64, d_model=128, n_layers=1, n_heads=4, vision=vc)
torch.manual_seed(0)
tower = VisionTower(mc)
if a.stem == "conv":
    enc = tower.encoder; w = vc.vit_dim
    # conv stem: 3x3 convs, total stride = patch_size (4): 3->w/2 s1, w/2->w/2 s2, w/2->w s2
    enc.stem = nn.Sequential(nn.Conv2d(3, w // 2, 3, 1, 1), nn.GELU(), nn.Conv2d(w // 2, w // 2, 3, 2, 1), nn.GELU(),
                             nn.Conv2d(w // 2, w, 3, 2, 1))
    def fwd(pixels, enc=enc):
        x = enc.stem(pixels).flatten(2).transpose(1, 2) + enc.pos_embed
        for b in enc.blocks: x = b(x)
        return enc.norm(x)
    enc.forward = fwd
if a.stem == "cnnvit":
    enc = tower.encoder; w = vc.vit_dim
    def blk(i, o): return [nn.Conv2d(i, o, 3, 1, 1), nn.GELU()]
    enc.stem = nn.Sequential(*blk(3, 32), *blk(32, 32), nn.MaxPool2d(2), *blk(32, 64), *blk(64, 64), nn.MaxPool2d(2), nn.Conv2d(64, w, 3, 1, 1))
    def fwd(pixels, enc=enc):
        x = enc.stem(pixels).flatten(2).transpose(1, 2) + enc.pos_embed
        for b in enc.blocks: x = b(x)
        return enc.norm(x)
    enc.forward = fwd
if a.stem == "cnn":
    enc = tower.encoder; w = vc.vit_dim
    def blk(i, o): return [nn.Conv2d(i, o, 3, 1, 1), nn.GELU()]
    enc.stem = nn.Sequential(*blk(3, 32), *blk(32, 32), nn.MaxPool2d(2), *blk(32, 64), *blk(64, 64), nn.MaxPool2d(2), nn.Conv2d(64, w, 3, 1, 1))
    del enc.blocks
    def fwd(pixels, enc=enc):
        return enc.norm(enc.stem(pixels).flatten(2).transpose(1, 2))
    enc.forward = fwd
T = vc.tokens_per_image
heads = nn.ModuleDict({"number": nn.Linear(T * 128, 21), "count": nn.Linear(T * 128, 7)})
def data(n, held):
    ss = images.generate(n, 7, held_out=held, size=vc.image_size, kinds=("number", "count"))
    x = torch.stack([load_image(s.image, vc) for s in ss])
    kind = [s.kind for s in ss]; y = torch.tensor([int(s.qa[0][2]) for s in ss])
    return x, kind, y
t0 = time.time()
xtr, ktr, ytr = data(a.n, False); xte, kte, yte = data(400, True)
gen_s = time.time() - t0
mtr = torch.tensor([k == "number" for k in ktr]); mte = torch.tensor([k == "number" for k in kte])
params = list(tower.parameters()) + list(heads.parameters())
opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
def loss_acc(x, y, m):
    z = tower(x).flatten(1)
    out = {}
    for name, mask in (("number", m), ("count", ~m)):
        if mask.any():
            logits = heads[name](z[mask]); yy = y[mask]
            if name == "count":
                out[name] = (F.cross_entropy(logits, yy), (logits.argmax(-1) == yy).float().mean().item())
            else:  # digit-wise, as the tokenizer writes numbers: tens (10 = none) and units
                tens = torch.where(yy >= 10, yy // 10, torch.full_like(yy, 10)); units = yy % 10
                lt, lu = logits[:, :11], logits[:, 11:]
                ok = (lt.argmax(-1) == tens) & (lu.argmax(-1) == units)
                out[name] = (F.cross_entropy(lt, tens) + F.cross_entropy(lu, units), ok.float().mean().item())
    return out
c0 = resource.getrusage(resource.RUSAGE_SELF); t0 = time.time()
g = torch.Generator().manual_seed(0)
for step in range(1, a.steps + 1):
    lr = a.lr * min(1, step / 10) * (0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(3.14159 * step / a.steps)).item()))
    for pg in opt.param_groups: pg["lr"] = lr
    i = torch.randint(0, len(ytr), (a.bs,), generator=g)
    out = loss_acc(xtr[i], ytr[i], mtr[i])
    loss = sum(v[0] for v in out.values())
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step()
    if step % max(1, a.steps // 4) == 0 or step == a.steps:
        with torch.no_grad():
            te = loss_acc(xte, yte, mte)
        print(f"step {step} loss {loss.item():.3f} held-out number {te['number'][1]:.3f} count {te['count'][1]:.3f}", flush=True)
c1 = resource.getrusage(resource.RUSAGE_SELF)
print(f"RESULT {vkw} lr={a.lr} steps={a.steps} bs={a.bs}: number {te['number'][1]:.3f} count {te['count'][1]:.3f} "
      f"train cpu {c1.ru_utime - c0.ru_utime + c1.ru_stime - c0.ru_stime:.0f}s wall {time.time() - t0:.0f}s (gen {gen_s:.0f}s)")

if a.save:
    torch.save(tower.state_dict(), a.save)
