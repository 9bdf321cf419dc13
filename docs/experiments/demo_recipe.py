"""The harness behind docs/experiments/demo-recipe.md, "How the recipe was found": train the demo's Imagen base (or unCLIP
decoder) alone, in memory, on a finished demo run's images and embeddings, then run the demo
check on the 48 held-out prompts at the model's own resolution. Not part of the pipeline: the
pipeline trains the same networks and diffusion through stages/training/trainer.py.

    .venv/bin/python docs/experiments/demo_recipe.py NAME '{"res": 16, "steps": 1300, "bs": 64, "floor": 1.0}'

Options (JSON): role (base | decoder), text (decoder only: clip_tokens | glide = the flavor's
variants, or t5 = the Imagen base's T5 tokens, a diagnostic), text_lr (lr multiplier of a glide
decoder's text transformer), freeze_text, emb_std (its token-embedding init), drop_img, res, steps, bs, lr, warm, ema, net (UNetConfig overrides,
e.g. {"coord_channels": true}), snr (Min-SNR gamma or null), floor (min_snr_floor), pred, guid,
samp_steps, thr (thresholding), load (NAME of an earlier run: sample only), run (the demo run
to read, default ./runs/demo), corpus ({"n", "sizes", "shapes"}: synthesize a corpus instead).
That page's 32px rows were measured with the demo flavor of that time (32px, attention at 16
and 8): reproduce them with '{"res": 32, "net": {"attn_resolutions": [16, 8], "coord_channels": false}}'.
Writes OUT/NAME.png (the 48 samples) and appends one line to OUT/results.txt (OUT: $OUT or /tmp/demo_recipe)."""
import sys, os, json, time, glob, tarfile, io, math
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")); os.environ.setdefault("HF_HUB_OFFLINE", "1")
import numpy as np, torch, dataclasses
from PIL import Image
name, o = sys.argv[1], json.loads(sys.argv[2])
torch.set_num_threads(o.get("threads", 1)); torch.manual_seed(o.get("seed", 0))
RUN = os.path.abspath(o.get("run", "runs/demo"))
OUT = os.environ.get("OUT", "/tmp/demo_recipe"); os.makedirs(OUT, exist_ok=True)
role = o.get("role", "base"); res = o.get("res", 32)
import data_prep.demo_corpus as _DC
if o.get("corpus"):
    if "sizes" in o["corpus"]: _DC.SIZES = {k: v for k, v in _DC.SIZES.items() if k in o["corpus"]["sizes"]}
    if "shapes" in o["corpus"]: _DC.SHAPES = tuple(x for x in _DC.SHAPES if x in o["corpus"]["shapes"])
from data_prep.demo_corpus import parse_caption, demo_prompts
from stages.nets.flavors import get_flavor
from stages.nets.unet import UNet
from stages.diffusion import Diffusion
from stages.sampling.loading import PromptEncoders
from stages.sampling import demo_check
cache = f"{OUT}/data_{res}.pt"
if o.get("corpus"):  # synthesize: {"n": 1024, "sizes": [...], "shapes": [...]}
    import data_prep.demo_corpus as DC
    co = o["corpus"]; cache = f"{OUT}/data_{res}_{abs(hash(json.dumps(co, sort_keys=True)))}.pt"
    if not os.path.exists(cache):
        held = set(DC.check_attrs())
        attrs = [a for a in DC.all_attrs() if a not in held and a.size in co.get("sizes", list(DC.SIZES)) and a.shape in co.get("shapes", list(DC.SHAPES))]
        rng = np.random.default_rng(0); pick = rng.integers(0, len(attrs), co.get("n", 1024))
        X, C = [], []
        for j, i in enumerate(pick):
            img = DC.render(attrs[i], 128, np.random.default_rng([0, j]))
            img = Image.open(io.BytesIO(DC._jpeg_bytes(img))).convert("RGB").resize((res, res), Image.BICUBIC)
            X.append(np.asarray(img)); C.append(DC.caption_of(attrs[i]))
        enc0 = PromptEncoders.load(glob.glob(f"{RUN}/embed/*/")[0].rstrip("/"))
        F0 = enc0.encode(C)
        L = F0.t5_tokens.shape[1]; T5 = torch.zeros(len(C), 32, F0.t5_tokens.shape[2]); T5[:, :L] = F0.t5_tokens; M = torch.zeros(len(C), 32, dtype=torch.bool); M[:, :L] = F0.t5_mask
        Lc = min(32, F0.clip_tokens.shape[1]); CT = torch.zeros(len(C), 32, F0.clip_tokens.shape[2]); CT[:, :Lc] = F0.clip_tokens[:, :Lc]; CM = torch.zeros(len(C), 32, dtype=torch.bool); CM[:, :Lc] = F0.clip_mask[:, :Lc]
        D = dict(x=torch.tensor(np.stack(X)).permute(0, 3, 1, 2).float() / 127.5 - 1, t5=T5, t5m=M, ct=CT, ctm=CM, ci=F0.clip_text, caps=C)
        torch.save(D, cache)
if os.path.exists(cache):
    D = torch.load(cache)
else:
    imgs, caps = {}, {}
    for t in glob.glob(f"{RUN}/download/*/shards/*.tar"):
        with tarfile.open(t) as tf:
            for m in tf.getmembers():
                k = m.name.split("/")[-1].rsplit(".", 1)
                if k[1] == "jpg": imgs[k[0]] = np.asarray(Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB").resize((res, res), Image.BICUBIC))
                if k[1] == "txt": caps[k[0]] = tf.extractfile(m).read().decode()
    X, T5, M, CI, CT, CM, C = [], [], [], [], [], [], []
    for f in sorted(glob.glob(f"{RUN}/embed/*/shards/*.npz")):
        d = np.load(f); o5 = np.concatenate([[0], np.cumsum(d["t5_lengths"])]); oc = np.concatenate([[0], np.cumsum(d["clip_lengths"])])
        for i, k in enumerate(d["keys"]):
            k = str(k); X.append(imgs[k]); C.append(caps[k])
            t = d["t5_tokens"][o5[i]:o5[i+1]].astype(np.float32); pad = np.zeros((32, t.shape[1]), np.float32); pad[:len(t)] = t; T5.append(pad)
            mm = np.zeros(32, bool); mm[:len(t)] = True; M.append(mm)
            c = d["clip_tokens"][oc[i]:oc[i+1]].astype(np.float32); pc = np.zeros((32, c.shape[1]), np.float32); pc[:len(c)] = c[:32]; CT.append(pc)
            cm = np.zeros(32, bool); cm[:min(32, len(c))] = True; CM.append(cm); CI.append(d["clip_image"][i].astype(np.float32))
    D = dict(x=torch.tensor(np.stack(X)).permute(0, 3, 1, 2).float() / 127.5 - 1, t5=torch.tensor(np.stack(T5)), t5m=torch.tensor(np.stack(M)),
             ct=torch.tensor(np.stack(CT)), ctm=torch.tensor(np.stack(CM)), ci=torch.tensor(np.stack(CI)), caps=C)
    torch.save(D, cache)
dims = {"t5_dim": D["t5"].shape[-1], "clip_dim": D["ci"].shape[-1], "clip_token_dim": D["ct"].shape[-1]}
text = o.get("text", "clip_tokens") if role == "decoder" else "t5"
net_over = {k: tuple(v) if isinstance(v, list) else v for k, v in o.get("net", {}).items()}
if text == "glide":  # the decoder flavor's glide variant (a GlideModel); `net` overrides go to its UNet
    from stages.nets.flavors import network_for
    cfg = get_flavor(role, "demo").config(dims, "glide")
    cfg = dataclasses.replace(cfg, unet=dataclasses.replace(cfg.unet, image_size=res, **net_over))
    net = network_for(cfg)
    if o.get("emb_std"): torch.nn.init.normal_(net.text.token_embedding.weight, std=o["emb_std"])
    if o.get("freeze_text"):
        for p in net.text.parameters(): p.requires_grad_(False)
    _F = PromptEncoders.load(glob.glob(f"{RUN}/embed/*/")[0].rstrip("/")).encode(D["caps"])
    IDS, IDM = _F.clip_ids, _F.clip_id_mask
else:
    cfg = get_flavor(role, "demo").config(dims, image_size=res, **net_over)
    if role == "decoder" and text == "t5":
        cfg = dataclasses.replace(cfg, text_dim=dims["t5_dim"])
    net = UNet(cfg)
nparam = sum(p.numel() for p in net.parameters())
diff = Diffusion(o.get("schedule", "cosine"), o.get("pred", "v"), min_snr_gamma=o.get("snr", 5.0), min_snr_floor=o.get("floor", 0.0))
steps, bs, lr = o.get("steps", 600), o.get("bs", 32), o.get("lr", 3e-3)
_text = [p for n, p in net.named_parameters() if p.requires_grad and n.startswith("text.")]
_rest = [p for n, p in net.named_parameters() if p.requires_grad and not n.startswith("text.")]
opt = torch.optim.AdamW([{"params": _rest}, {"params": _text, "lr": lr * o.get("text_lr", 1.0)}] if _text else _rest,
                        lr=lr, weight_decay=0.0)
warm = o.get("warm", 20)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warm if s < warm else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1, (s - warm) / max(1, steps - warm)))))
ema = [p.detach().clone() for p in net.parameters()]; ema_decay = o.get("ema", 0.999)
N = len(D["x"]); g = torch.Generator().manual_seed(0)
tmax = o.get("tmax", 1.0)
def cond_of(idx, drop):
    if role == "base":
        return dict(text_tokens=D["t5"][idx], text_mask=D["t5m"][idx], drop_text=drop)
    img = dict(image_embed=D["ci"][idx], drop_text=drop, drop_image=torch.rand(len(idx)) < o.get("drop_img", 0.1))
    if text == "glide":
        return dict(clip_ids=IDS[idx], clip_id_mask=IDM[idx], **img)
    if text == "t5":
        return dict(text_tokens=D["t5"][idx], text_mask=D["t5m"][idx], **img)
    return dict(text_tokens=D["ct"][idx], text_mask=D["ctm"][idx], **img)
t0 = time.time(); c0 = time.process_time(); losses = [0.0]
if o.get("load"):
    steps = 0; net.load_state_dict(torch.load(f"{OUT}/{o['load']}.pt")); ema = [p.detach().clone() for p in net.parameters()]
for s in range(steps):
    idx = torch.randint(0, N, (bs,), generator=g)
    x0 = D["x"][idx]
    if o.get("flip"): pass
    drop = torch.rand(bs) < o.get("drop", 0.1)
    t = torch.rand(bs) * tmax
    loss, st = diff.training_loss(net, x0, cond_of(idx, drop), t=t)
    opt.zero_grad(set_to_none=True); loss.backward(); torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0); opt.step(); sched.step()
    d = min(ema_decay, (1 + s) / (10 + s))
    with torch.no_grad(): torch._foreach_lerp_(ema, [p.detach() for p in net.parameters()], 1 - d)
    losses.append(loss.item())
    if (s + 1) % 100 == 0: print(f"{name} step {s+1} loss {np.mean(losses[-100:]):.4f} {time.process_time()-c0:.0f}cpu-s", flush=True)
train_cpu = time.process_time() - c0
with torch.no_grad():
    for p, e in zip(net.parameters(), ema): p.copy_(e)
net.eval()
enc = PromptEncoders.load(glob.glob(f"{RUN}/embed/*/")[0].rstrip("/"))
prompts = demo_prompts(o.get("nprompts", 48))
F = enc.encode(prompts)
# decoder: CLIP image embedding from a rendered ground truth? use the true clip image embedding of render (oracle prior)
from data_prep.demo_corpus import render, check_attrs
if role == "base":
    cond = dict(text_tokens=F.t5_tokens, text_mask=F.t5_mask)
else:
    from data_prep.image_decode import preprocess_image
    from data_prep.demo_corpus import _jpeg_bytes
    pp = enc.preprocess
    pix = torch.from_numpy(np.stack([preprocess_image(_jpeg_bytes(render(a, 128)), pp) for a in check_attrs(o.get("nprompts", 48))]))
    ie = torch.nn.functional.normalize(enc.clip.encode_image(pix).float(), dim=-1)  # oracle prior: the true image embedding
    cond = dict(text_tokens=F.clip_tokens[:, :32], text_mask=F.clip_mask[:, :32], image_embed=ie)
    if text == "glide":
        cond = dict(clip_ids=F.clip_ids, clip_id_mask=F.clip_id_mask, image_embed=ie)
    if text == "t5":
        cond = dict(text_tokens=F.t5_tokens, text_mask=F.t5_mask, image_embed=ie)
    if o.get("drop_img", 0.1) >= 1:  # trained without the embedding: sample without it too
        cond["drop_image"] = torch.ones(len(prompts), dtype=torch.bool)
gs = torch.Generator().manual_seed(1)
out = diff.sample(net, (len(prompts), 3, res, res), cond, sampler="dpmpp_2m", steps=o.get("samp_steps", 12), guidance_scale=o.get("guid", 3.0), thresholding=o.get("thr", "dynamic"), generator=gs)
out = out.clamp(-1, 1)
pil = [Image.fromarray(((x.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)) for x in out]
chk = demo_check.check_samples(list(zip(prompts, pil)))
bg = float(np.mean([demo_check.background_std(p) for p in pil]))
line = f"{name} {o} params={nparam} train_cpu={train_cpu:.0f}s loss={np.mean(losses[-100:]):.4f} colour={chk.colour_accuracy:.3f} position={chk.position_accuracy:.3f} bg_std={bg:.1f}"
print(line, flush=True); open(f"{OUT}/results.txt", "a").write(line + "\n")
W = 8; grid = Image.new("RGB", (W * res, math.ceil(len(pil) / W) * res))
for i, p in enumerate(pil): grid.paste(p, ((i % W) * res, (i // W) * res))
grid.resize((grid.width * 2, grid.height * 2), Image.NEAREST).save(f"{OUT}/{name}.png")
if not o.get("load"): torch.save(net.state_dict(), f"{OUT}/{name}.pt")
