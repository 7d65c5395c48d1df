"""Reward steering of a masked diffusion model: pretrained vs discrete SVDD (K = 2, 4) vs DRAKES fine-tuning.

The task: digit ``--digit`` from the class-conditional model's NULL class (unconditional sampling), all rows by the
ancestral sampler at ``--steps`` steps on the same per-sequence seeds (``--seed``), ``n`` sequences each.

Two judges, never the same network:

* the TRAINING reward ``log p(digit | image)`` of a small CNN trained here on the binarised training digits
  (``RewardNet``, cached; SVDD values candidates by it and DRAKES backpropagates through it);
* the HELD-OUT oracle: hasten's bundled MNIST classifier (``class:<digit>``, trained on grey-level digits, never
  used for steering): its log-probability of the digit and the share it classifies as the digit. Its features are
  also the FD space: FD against the 5,000 held-out digits binarised at 0.5, and against the held-out digits of the
  target class alone (a perfect steered set is far from all ten classes by construction; the class FD says whether
  its digits look like real ones of that class). Floors: binarised training digits (of the class) vs the same.

Each row: both rewards (mean), both shares of the digit, FD, network calls per sequence (mean, max), sampling
seconds (one thread). DRAKES is trained by ``--train-drakes MINUTES`` into ``--drakes`` (resumable) and reports its
training cost. Results: ``benchmarks/results/discrete/reward.json`` (rows kept across reruns with the same settings).

    OMP_NUM_THREADS=1 PYTHONPATH=src nice -n 15 python benchmarks/discrete/reward_measure.py \
        --model /work/runs/mnist-mdm-peek --drakes /tmp/drakes-3 --train-drakes 15
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import time

import torch
from torch import Tensor, nn

from hasten._io import cache_dir
from hasten.data import load_mnist
from hasten.discrete import load_masked
from hasten.discrete.drakes import DrakesConfig, fine_tune
from hasten.discrete.generate import row_generators
from hasten.discrete.sampling import AncestralSampler
from hasten.discrete.svdd import DiscreteSVDD
from hasten.metrics.fd import frechet_distance, gaussian_stats
from hasten.metrics.features import features
from hasten.rewards import Reward, get_reward
from hasten.viz import save_grid

OUT = pathlib.Path(__file__).resolve().parents[1] / "results" / "discrete" / "reward.json"
DOCS = pathlib.Path(__file__).resolve().parents[2] / "docs" / "guide"


class RewardNet(nn.Module):
    """A small CNN on binarised 28x28 digits (the training reward; NOT the bundled feature net)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, stride=2, padding=1), nn.SiLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.SiLU(),
            nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.SiLU(), nn.Linear(64, 10),
        )  # fmt: skip

    def forward(self, images01: Tensor) -> Tensor:
        return self.body(images01.float())


def binary(split: str) -> tuple[Tensor, Tensor]:
    data = load_mnist(split)
    return (data.images >= 128).float(), data.labels


def reward_net(epochs: int = 8, seed: int = 0) -> tuple[RewardNet, dict]:
    """The training reward's classifier, trained once on the binarised training digits and cached."""
    from safetensors.torch import load_file, save_file

    path = cache_dir() / "discrete-reward" / f"reward-net-e{epochs}-s{seed}.safetensors"
    net = RewardNet()
    images, labels = binary("train")
    held_images, held_labels = binary("heldout")
    if path.exists():
        net.load_state_dict(load_file(str(path)))
    else:
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        opt = torch.optim.Adam(net.parameters(), lr=2e-3)
        for _ in range(epochs):
            for idx in torch.randperm(len(images), generator=gen).split(64):
                loss = nn.functional.cross_entropy(net(images[idx]), labels[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    net.eval().requires_grad_(False)
    with torch.no_grad():
        accuracy = float((net(held_images).argmax(1) == held_labels).double().mean())
    return net, {"architecture": "2 conv + 2 linear, SiLU", "trained_on": "5,000 binarised training digits",
                 "epochs": epochs, "heldout_accuracy_binarised": accuracy}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mnist-mdm")
    parser.add_argument("--digit", type=int, default=3)
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--particles", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--drakes", default=None, help="DRAKES folder (trained there by --train-drakes); its rows are "
                        "named by its alpha")  # fmt: skip
    parser.add_argument("--train-drakes", type=float, default=0.0, help="DRAKES training minutes (0: only measure)")
    parser.add_argument("--truncate", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=1e-3)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument("--grid", type=int, default=0,
                        help="also save each row's first GRID samples (the same sequences: per-sequence seeds) as "
                        "docs/guide/discrete-reward-<row>.png")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(1)

    net, net_info = reward_net()
    digit = args.digit
    train_reward = Reward(lambda im: net(im).log_softmax(1)[:, digit], f"reward-net:{digit}")
    oracle = get_reward(f"class:{digit}")

    if args.drakes and args.train_drakes > 0 and not (pathlib.Path(args.drakes) / "hasten.json").exists():
        config = DrakesConfig(base=str(args.model), reward=f"reward-net:{digit}", steps=args.steps,
                              truncate=args.truncate, alpha=args.alpha, lr=args.lr, batch_size=args.batch_size,
                              minutes=args.train_drakes, checkpoint_minutes=2.0)  # fmt: skip
        start = time.perf_counter()
        record = fine_tune(args.drakes, config, train_reward, progress=False)
        last = record["drakes"]
        print(f"DRAKES: {record['steps']} steps in {record['seconds']} s (this call {time.perf_counter() - start:.0f} "
              f"s); last batch reward {last['last_batch_reward']:.3f} KL {last['last_batch_kl']:.4f}",
              flush=True)  # fmt: skip
    if args.train_only:
        return

    model = load_masked(args.model)
    null = model.info.num_classes
    settings = {"model": str(args.model), "fingerprint": model.fingerprint, "digit": digit, "n": args.n,
                "steps": args.steps, "seed": args.seed, "label": "null class", "sampler": "ancestral"}  # fmt: skip
    record = json.loads(OUT.read_text()) if OUT.exists() else {}
    if record.get("settings") != settings:
        record = {"settings": settings, "rows": {}}
    record["training_reward"] = net_info
    record["oracle"] = f"hasten's bundled MNIST classifier (class:{digit}); FD in its features"
    record["machine"] = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                         "threads": torch.get_num_threads()}  # fmt: skip
    rows = record["rows"]

    # references: every held-out digit, and the held-out digits of the target class (a set of good 3s is far from
    # all digits by construction, so the class FD is the one that tells good 3s from bad); floors: training digits
    held, held_labels = binary("heldout")
    train_images, train_labels = binary("train")
    ref_all = gaussian_stats(features(held, "mnist")[0])
    ref_digit = gaussian_stats(features(held[held_labels == digit], "mnist")[0])
    floor_all = features(train_images[: args.n], "mnist")[0]
    floor_digit = features(train_images[train_labels == digit][: args.n], "mnist")[0]
    record["fd_floor_binarised_real_vs_real"] = frechet_distance(*gaussian_stats(floor_all), *ref_all)
    record["fd_floor_digit_real_vs_real"] = frechet_distance(*gaussian_stats(floor_digit), *ref_digit)
    record["fd_floor_digit_n"] = len(floor_digit)

    def save() -> None:
        OUT.parent.mkdir(parents=True, exist_ok=True)
        tmp = OUT.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        tmp.replace(OUT)

    def measure(name: str, sampler, loaded=model, extra: dict | None = None) -> None:
        picture = DOCS / f"discrete-reward-{name}.png"
        if args.grid and not picture.exists():
            x = torch.full((args.grid, loaded.length), loaded.mask_id, dtype=torch.long)
            labels = torch.full((args.grid,), null, dtype=torch.long)
            out = sampler.bind(loaded).run(loaded.model(labels), x, loaded.mask_id,
                                           row_generators(args.seed, range(args.grid)))  # fmt: skip
            save_grid(loaded.to_images(out.tokens), picture, nrow=8)
        if "fd_heldout_digit" in rows.get(name, {}):
            print(f"{name}: kept")
            return
        labels = torch.full((args.n,), null, dtype=torch.long)
        x = torch.full((args.n, loaded.length), loaded.mask_id, dtype=torch.long)
        sampler = sampler.bind(loaded)
        start = time.perf_counter()
        out = sampler.run(loaded.model(labels), x, loaded.mask_id, row_generators(args.seed, range(args.n)))
        seconds = time.perf_counter() - start
        images = loaded.to_images(out.tokens)
        with torch.no_grad():
            r_train = train_reward(images)
            r_oracle = oracle(images)
            feats, logits = features(images, "mnist")
        rows[name] = {
            "training_reward_mean": float(r_train.mean()),
            "training_net_share_digit": float((net(images).argmax(1) == digit).double().mean()),
            "oracle_reward_mean": float(r_oracle.mean()),
            "oracle_share_digit": float((logits.argmax(1) == digit).double().mean()),
            "fd_binarised_heldout": frechet_distance(*gaussian_stats(feats), *ref_all),
            "fd_heldout_digit": frechet_distance(*gaussian_stats(feats), *ref_digit),
            "ink": float(images.mean()),
            "calls_mean": float(out.calls.double().mean()), "calls_max": int(out.calls.max()),
            "seconds": seconds, "n": args.n, **(extra or {}),
        }  # fmt: skip
        save()
        r = rows[name]
        print(f"{name}: reward {r['training_reward_mean']:.3f} oracle {r['oracle_reward_mean']:.3f} "
              f"share(oracle) {r['oracle_share_digit']:.3f} FD {r['fd_binarised_heldout']:.0f} "
              f"FD({digit}s) {r['fd_heldout_digit']:.0f} "
              f"calls {r['calls_mean']:.1f} {seconds:.0f} s", flush=True)  # fmt: skip

    base = {"name": "ancestral", "steps": args.steps}
    plain = AncestralSampler(steps=args.steps)
    measure("pretrained", plain)
    for k in args.particles:
        measure(f"svdd-{k}", DiscreteSVDD(base=base, reward=train_reward, particles=k), extra={"particles": k})
    if args.drakes and (pathlib.Path(args.drakes) / "hasten.json").exists():
        tuned = load_masked(args.drakes)
        info = tuned.info.training
        tag = f"drakes-alpha{info['drakes']['alpha']:g}"
        record.setdefault("drakes_training", {})[tag] = {k: info[k] for k in ("config", "steps", "seconds", "machine",
                                                                               "drakes")}  # fmt: skip
        measure(tag, plain, tuned, {"training_seconds": info["seconds"], "training_steps": info["steps"]})
        for k in args.particles[-1:]:
            measure(f"{tag}+svdd-{k}", DiscreteSVDD(base=base, reward=train_reward, particles=k), tuned,
                    {"particles": k})  # fmt: skip
    save()
    print(f"-> {OUT}")


if __name__ == "__main__":
    main()
