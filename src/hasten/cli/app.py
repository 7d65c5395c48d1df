"""``hasten`` command line: sample, evaluate, bench, report, tune, quantize, accelerate, train, distill, ensemble,
optimize (--format json)."""

from __future__ import annotations

import json
import pathlib
import sys
from enum import Enum
from typing import Annotated, Any

import typer

from .._quiet import silence_peer_import_noise

silence_peer_import_noise()  # before any command imports a diffusers model class (and with it torchao)

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Make diffusion models sample fast, and prove it.")


class OutputFormat(str, Enum):
    text = "text"
    json = "json"


# Options shared by several commands (one definition each, huggingface_hub-CLI style).
FormatOption = Annotated[OutputFormat, typer.Option("--format", help="text for people, json for scripts")]
ModelOption = Annotated[str, typer.Option(help="bundled model name or a model folder")]
SolverOption = Annotated[str, typer.Option(help="solver name; see `hasten.available()`")]
SolverSpecOption = Annotated[
    str, typer.Option(help="solver name, options after a colon (unipc:order=3,variant=bh2); see `hasten.available()`")
]
StepsOption = Annotated[int, typer.Option(min=1, help="solver steps")]
SampleBatchOption = Annotated[
    int,
    typer.Option(
        min=1,
        help="images per network batch; under torchrun each process samples whole batches, so keep it fixed to "
        "reproduce a run",
    ),
]
SeedOption = Annotated[int, typer.Option(help="noise seed")]
GuidanceOption = Annotated[float, typer.Option(help="classifier-free guidance scale (1 = none)")]
ScheduleOption = Annotated[
    str,
    typer.Option(help="discretisation: auto (trailing for DDPM-type, uniform time for flow, else karras), karras, ..."),
]

# A diffusers pipeline instead of --model (sample, tune, bench), and what to condition it on.
PipelineOption = Annotated[
    pathlib.Path | None,
    typer.Option(help="a diffusers pipeline folder to use instead of --model (SD, SDXL, DiT, PixArt, SD3, Flux, DDPM)"),
]
PromptOption = Annotated[list[str] | None, typer.Option(help="--pipeline: a prompt (repeatable; samples cycle)")]
NegativePromptOption = Annotated[str | None, typer.Option(help="--pipeline: the negative prompt")]
PromptEmbedsOption = Annotated[
    pathlib.Path | None,
    typer.Option(help="--pipeline: safetensors of encoded prompts (prompt_embeds, negative_prompt_embeds, ...)"),
]
ClassLabelOption = Annotated[list[int] | None, typer.Option(help="--pipeline (DiT): a class (repeatable)")]
HeightOption = Annotated[int | None, typer.Option(help="--pipeline: image height in pixels")]
WidthOption = Annotated[int | None, typer.Option(help="--pipeline: image width in pixels")]
AllowPickleOption = Annotated[
    bool,
    typer.Option(
        help="--pipeline: also load pickled (.bin) weights where a part has no safetensors (unpickling runs code "
        "the file carries: only for folders you trust)"
    ),
]


def _set_quant_execution(loaded: Any, execution: str) -> None:
    """Apply ``--execution`` to a quantised model; refuse anything but ``auto`` for a float one."""
    from ..quant import is_quantized, set_execution
    from ..quant.modules import EXECUTIONS

    if execution not in EXECUTIONS:
        raise ValueError(f"--execution must be one of {', '.join(EXECUTIONS)}, got {execution!r}")
    if is_quantized(loaded.network):
        set_execution(loaded.network, execution)
    elif execution != "auto":
        raise ValueError(f"--execution {execution} applies to quantised models (from `hasten quantize`) only")


def _pipeline_source(
    pipeline, prompt, negative_prompt, prompt_embeds, class_label, height, width, guidance=None, allow_pickle=False
):
    """The --pipeline options as a :class:`hasten.bench.matrix.PipelineSource` (None without --pipeline)."""
    from ..bench.matrix import PipelineSource

    if pipeline is None:
        if any(v is not None for v in (prompt, negative_prompt, prompt_embeds, class_label, height, width)):
            _fail("--prompt, --negative-prompt, --prompt-embeds, --class-label, --height and --width go with "
                  "--pipeline DIR")  # fmt: skip
        if allow_pickle:
            _fail("--allow-pickle goes with --pipeline DIR")
        return None
    try:
        return PipelineSource(
            str(pipeline), prompts=tuple(prompt or ()), negative_prompt=negative_prompt,
            embeds=str(prompt_embeds or ""), class_labels=tuple(class_label or ()), height=height, width=width,
            guidance=guidance, allow_pickle=allow_pickle,
        )  # fmt: skip
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err))


def _under_torchrun() -> bool:
    """Whether torchrun started this process among others (read from its environment: no torch import)."""
    import os

    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _is_main() -> bool:
    """Whether this process prints results (rank 0 of a torchrun job, or the only process)."""
    if not _under_torchrun():
        return True
    from .. import distributed

    return distributed.is_main()


def _fail(message: str) -> None:
    if _is_main():
        typer.echo(f"error: {message}", err=True)
    else:  # every rank checks the same inputs; a rank's own failure still says which rank it is
        import os

        typer.echo(f"error (rank {os.environ.get('RANK')}): {message}", err=True)
    # SystemExit, not typer.Exit: click's Exit is a RuntimeError, which a command's `except RuntimeError` around
    # the call would catch and report again as "error: 2"
    raise SystemExit(2)


def _emit(fmt: OutputFormat, data: dict[str, Any], text: str) -> None:
    if not _is_main():
        return
    if fmt is OutputFormat.json:
        typer.echo(json.dumps(data))
    else:
        typer.echo(text)


@app.command()
def sample(
    model: Annotated[str | None, typer.Option(help="bundled model name or a model folder [default: mnist-dit]")] = None,
    solver: Annotated[
        str | None,
        typer.Option(
            help="solver name, options after a colon (unipc:order=3,variant=bh2) [default: the model's own sampler "
            "(a distilled student's), else dpmpp_2m]"
        ),
    ] = None,
    steps: Annotated[
        int | None, typer.Option(min=1, help="solver steps [default: the model's own sampler's, else 10]")
    ] = None,
    n: Annotated[int, typer.Option("--n", "--num-samples", min=1, help="number of images")] = 64,
    batch_size: SampleBatchOption = 256,
    seed: Annotated[int | None, typer.Option(help="noise seed [default: the recipe's, else 0]")] = None,
    out: Annotated[pathlib.Path, typer.Option(help="PNG grid to write")] = pathlib.Path("grid.png"),
    save: Annotated[
        pathlib.Path | None,
        typer.Option(help="also write the images to this .npz (samples [N, C, H, W] in [0, 1]; labels if any)"),
    ] = None,
    guidance: Annotated[
        float | None,
        typer.Option(help="classifier-free guidance scale (default: 1 = none, the plan's, or the pipeline's)"),
    ] = None,
    label: Annotated[int | None, typer.Option(help="class to sample (default: spread over the classes)")] = None,
    schedule: Annotated[
        str | None,
        typer.Option(
            help="discretisation: auto (trailing for DDPM-type, uniform time for flow, else karras), karras, ... "
            "[default: the model's own sampler's, else auto]"
        ),
    ] = None,
    reward: Annotated[
        str | None,
        typer.Option(
            help="steer sampling by a reward without gradients (SVDD): class:<digit>, ink, symmetry; the solver "
            "must be ancestral [default solver with a reward: ddpm]"
        ),
    ] = None,
    particles: Annotated[
        int, typer.Option(min=1, help="candidates per step for --reward (1: plain sampling, scored)")
    ] = 1,
    alpha: Annotated[
        float, typer.Option(min=0.0, help="--reward temperature: 0 keeps the best candidate, > 0 draws by softmax")
    ] = 0.0,
    plan: Annotated[
        pathlib.Path | None, typer.Option(help="a plan from `hasten tune` (replaces --solver, --steps, --schedule)")
    ] = None,
    force_plan: Annotated[bool, typer.Option(help="use a plan made for other weights")] = False,
    accel: Annotated[
        pathlib.Path | None, typer.Option(help="a cache config (from `hasten accelerate calibrate`) to apply")
    ] = None,
    recipe: Annotated[
        pathlib.Path | None,
        typer.Option(
            help="a recipe (from `hasten optimize`, `tune`, `quantize`, `accelerate calibrate`): it names "
            "the model, sampler, cache and quantisation, so no other sampler option is needed"
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option(help="sample a plan, cache or quantised folder made for another setting or other weights")
    ] = False,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    execution: Annotated[
        str,
        typer.Option(
            help="a quantised model's kernels: auto (integer kernels where the device has them), kernel, float8 "
            "(e4m3 linear layers on CUDA GPUs of compute capability 8.9+), simulated"
        ),
    ] = "auto",
    pipeline: PipelineOption = None,
    prompt: PromptOption = None,
    negative_prompt: NegativePromptOption = None,
    prompt_embeds: PromptEmbedsOption = None,
    class_label: ClassLabelOption = None,
    height: HeightOption = None,
    width: WidthOption = None,
    allow_pickle: AllowPickleOption = False,
    oms: Annotated[
        str | None,
        typer.Option(
            help="One More Step: an OMS module (.safetensors from hasten.oms.train_oms, or a bundled name: mnist) "
            "predicts the start at SNR 0 and the model's first-level prediction"
        ),
    ] = None,
    fmt: FormatOption = OutputFormat.text,
) -> None:
    """Sample a model (or a diffusers pipeline) and write an image grid; prints NFE and sampling seconds
    (loading and decoding excluded). Every setting is checked as a recipe before sampling: a cache calibrated
    for another step count or grid, or a plan for other weights, is refused unless --force."""
    import numpy as np
    import torch

    from .._io import atomic_path
    from ..distributed import shard_batches
    from ..generate import generate, resolve_sampler
    from ..recipe import Recipe, RecipeError, load_recipe
    from ..rewards import REWARD_SOLVER, get_reward
    from ..solvers import parse_solver
    from ..tune.plan import PlanError
    from ..viz import save_grid

    _check_writable(out, "--out")
    if save is not None:
        _check_writable(save, "--save")
    device = _check_device(device)
    _check_guidance(guidance)
    from ..discrete import is_masked_folder

    if model is not None and is_masked_folder(model):
        not_for_masked = [name for name, value, default in (
            ("--schedule", schedule, None), ("--plan", plan, None), ("--force-plan", force_plan, False),
            ("--accel", accel, None), ("--recipe", recipe, None), ("--force", force, False),
            ("--execution", execution, "auto"), ("--pipeline", pipeline, None), ("--prompt", prompt, None),
            ("--negative-prompt", negative_prompt, None), ("--prompt-embeds", prompt_embeds, None),
            ("--class-label", class_label, None), ("--height", height, None), ("--width", width, None),
            ("--oms", oms, None),
        ) if value != default]  # fmt: skip
        if not_for_masked:
            _fail(f"{model} is a masked (discrete) diffusion model; {', '.join(not_for_masked)} appl"
                  f"{'ies' if len(not_for_masked) == 1 else 'y'} to continuous models only")  # fmt: skip
        if particles != 1 and reward is None:
            _fail(f"--particles {particles} chooses among candidates by a reward; give --reward too")
        _sample_masked(model, solver, steps, n, batch_size, seed, out, save, guidance, label, device, fmt,
                       reward=reward, particles=particles, alpha=alpha)  # fmt: skip
        return
    if recipe is not None:
        given = [name for name, value, default in (
            ("--model", model, None), ("--solver", solver, None), ("--steps", steps, None),
            ("--schedule", schedule, None), ("--plan", plan, None), ("--accel", accel, None),
            ("--guidance", guidance, None), ("--execution", execution, "auto"), ("--pipeline", pipeline, None),
            ("--force-plan", force_plan, False), ("--oms", oms, None),
        ) if value != default]  # fmt: skip
        if given:
            _fail(f"--recipe names the model and the whole sampler; drop {', '.join(given)} (or edit the recipe)")
    source = _pipeline_source(
        pipeline, prompt, negative_prompt, prompt_embeds, class_label, height, width, allow_pickle=allow_pickle
    )
    if particles != 1 and reward is None:
        _fail(f"--particles {particles} chooses among candidates by a reward; give --reward too")
    try:
        if reward is not None:
            get_reward(reward)  # an unknown name or bad argument fails before loading
        if recipe is not None:
            the_recipe = load_recipe(recipe)
            loaded = the_recipe.load_model(device=device)
        else:
            from ..models.zoo import load

            solver_name, solver_options = (None, {}) if solver is None else parse_solver(solver)
            if reward is not None and solver_name is None:
                solver_name = REWARD_SOLVER  # reward guidance draws candidates from an ancestral step
            loaded = load(model or "mnist-dit", device=device) if source is None else source.load(device=device)
            _set_quant_execution(loaded, execution)
            # the model's own sampler when no sampler flag is given (a distilled student's); with --plan the
            # library's defaults fill the fields the plan replaces, as before
            solver_name, steps, schedule, solver_options, guidance = resolve_sampler(
                loaded, solver_name, steps, schedule, solver_options, guidance, use_own=plan is None
            )
            # a pipeline's recipe names it by its folder name only (it cannot carry the prompts): sampled here,
            # never written
            the_recipe = Recipe.from_files(
                loaded, plan=plan, accel=accel, force=force or force_plan, solver=solver_name, options=solver_options,
                schedule=schedule, steps=steps, guidance=guidance, oms=None if oms is None else str(oms),
            )  # fmt: skip
            the_recipe.check_model(loaded)
    except (FileNotFoundError, PlanError, RecipeError, ValueError, TypeError, RuntimeError) as err:
        _fail(str(err))
    except KeyError as err:
        _fail(str(err.args[0]) if err.args else str(err))
    steps, schedule, description = the_recipe.steps, the_recipe.schedule, the_recipe.describe()
    solver = "plan:" + pathlib.Path(str(plan)).name if plan is not None else description
    progress = None
    if fmt is OutputFormat.text and sys.stderr.isatty():
        from rich.progress import Progress

        progress = Progress(transient=True)
    task = None
    try:
        if progress is not None:
            progress.start()
            task = progress.add_task("sampling", total=steps * len(shard_batches(n, batch_size)))

        def tick(i, sigma, x):
            if progress is not None:
                progress.advance(task)

        _agree("sample", loaded, the_recipe, n=n, seed=seed, label=label, batch_size=batch_size)
        result = generate(
            loaded, n, recipe=the_recipe, seed=seed, label=label, callback=tick, batch_size=batch_size, reward=reward,
            particles=particles, alpha=alpha,
        )  # fmt: skip
    except FloatingPointError as err:
        scale = the_recipe.effective_guidance
        _fail(_non_finite(err, loaded.default_guidance if scale is None else scale))
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        _fail(str(err.args[0]) if err.args else str(err))
    finally:
        if progress is not None:
            progress.stop()
    save_grid(result.images01, out)
    if save is not None:
        with atomic_path(save) as tmp, open(tmp, "wb") as fh:  # a file object: numpy adds no ".npz"
            arrays = {"samples": result.images01.numpy().astype(np.float32)}
            if result.labels is not None:
                arrays["labels"] = result.labels.numpy().astype(np.int64)
            np.savez_compressed(fh, **arrays)
    used_seed = the_recipe.seed if seed is None else seed
    used_guidance = the_recipe.effective_guidance
    data = {
        "model": loaded.info.name,
        "solver": solver,
        "schedule": schedule,
        "steps": steps,
        "n": n,
        "seed": used_seed,
        "guidance": used_guidance if used_guidance is not None else loaded.default_guidance,
        "label": label,
        "plan": None if plan is None else str(plan),
        "recipe": None if recipe is None else str(recipe),
        "recipe_digest": the_recipe.digest(),
        "nfe": result.nfe,
        "seconds": result.seconds,
        "images_per_second": n / result.seconds,
        "out": str(out),
        "save": None if save is None else str(save),
        "device": str(torch.device(device)),
        "accel": None if accel is None else str(accel),
        "accel_stats": result.accel_stats,
        "oms": the_recipe.oms,
        "reward": reward,
        "particles": particles,
        "alpha": alpha,
        "reward_mean": None if result.rewards is None else float(result.rewards.mean()),
        "reward_p10": None if result.rewards is None else float(result.rewards.quantile(0.1)),
    }
    cache = ""
    if result.accel_stats is not None:
        st = result.accel_stats
        cache = (
            f", cache: {st['reused']} of {st['calls']} network calls reused, "
            f"{st['saved_fraction']:.0%} of the work skipped"
        )
    scored = ""
    if result.rewards is not None:
        scored = (
            f", reward {reward} with {particles} particle(s): mean {data['reward_mean']:.4g}, "
            f"10th percentile {data['reward_p10']:.4g}"
        )
    _emit(
        fmt,
        data,
        f"{loaded.info.name}: {n} images with {description}, {result.nfe} NFE, "
        f"{result.seconds:.2f} s ({n / result.seconds:.1f} images/s){cache}{scored} -> {out}",
    )


def _sample_masked(
    model, solver, steps, n, batch_size, seed, out, save, guidance, label, device, fmt, *, reward, particles, alpha
) -> None:
    """`hasten sample --model <masked model>`: a discrete sampler (--solver: ancestral or first_hitting with
    options; --steps: the call budget) from all-MASK sequences, steered by discrete SVDD around it with --reward;
    the grid and --save as for continuous models."""
    import numpy as np
    import torch

    from .._io import atomic_path
    from ..discrete import generate_masked, load_masked, parse_discrete_sampler
    from ..viz import save_grid

    try:
        loaded = load_masked(model, device=device)
        own = solver is None and steps is None  # no sampler setting: the model's own sampler
        sampler = loaded.default_sampler() if own else parse_discrete_sampler(solver, steps)
        if reward is not None:  # discrete SVDD: K candidate moves of the named sampler, valued by the reward
            from ..discrete.svdd import DiscreteSVDD
            from ..rewards import get_reward

            get_reward(reward)  # an unknown name or bad argument fails before sampling
            sampler = DiscreteSVDD(base=sampler, reward=reward, particles=particles, alpha=alpha)
        sampler.check_length(loaded.length)
        labels = loaded.labels(n, label)
        loaded.model(labels, 1.0 if guidance is None else guidance)  # checks guidance against the labels
    except (FileNotFoundError, KeyError, TypeError, ValueError) as err:
        _fail(str(err.args[0]) if err.args else str(err))
    if _under_torchrun():
        _fail(f"{model} is a masked model; its sampling is not sharded over processes: run it without torchrun")
    progress = None
    if fmt is OutputFormat.text and sys.stderr.isatty():
        from rich.progress import Progress

        progress = Progress(transient=True)
    try:
        task = None if progress is None else progress.add_task("sampling", total=n)
        if progress is not None:
            progress.start()
        result = generate_masked(
            loaded, n, sampler, seed=0 if seed is None else seed, labels=labels,
            guidance=1.0 if guidance is None else guidance, batch_size=batch_size,
            callback=None if progress is None else (lambda done, total: progress.update(task, completed=done)),
        )  # fmt: skip
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        _fail(str(err.args[0]) if err.args else str(err))
    finally:
        if progress is not None:
            progress.stop()
    save_grid(result.images01, out)
    if save is not None:
        with atomic_path(save) as tmp, open(tmp, "wb") as fh:
            arrays = {"samples": result.images01.numpy().astype(np.float32), "tokens": result.tokens.numpy()}
            if result.labels is not None:
                arrays["labels"] = result.labels.numpy().astype(np.int64)
            np.savez_compressed(fh, **arrays)
    description = sampler.describe()
    data = {
        "model": loaded.info.name, "solver": description, "sampler": sampler.to_dict(), "n": n,
        "seed": 0 if seed is None else seed, "guidance": 1.0 if guidance is None else guidance, "label": label,
        "nfe": result.nfe, "mean_calls": result.mean_calls, "seconds": result.seconds,
        "images_per_second": n / result.seconds, "out": str(out), "save": None if save is None else str(save),
        "device": str(torch.device(device)), "reward": reward, "particles": particles, "alpha": alpha,
        "mean_energy_calls": None if result.energy_calls is None else float(result.energy_calls.double().mean()),
    }  # fmt: skip
    scored = ""
    if result.energy_calls is not None:
        scored = f", {data['mean_energy_calls']:.1f} energy evaluations per sample"
    if reward is not None:
        from ..rewards import get_reward

        values = get_reward(reward)(result.images01).detach().cpu().double()
        data |= {"reward_mean": float(values.mean()), "reward_p10": float(values.quantile(0.1))}
        scored += f", reward {reward} with {particles} particle(s): mean {data['reward_mean']:.4g}"
    _emit(fmt, data, f"{loaded.info.name}: {n} images with {description}, {result.nfe} network calls "
                     f"({result.mean_calls:.1f} per sample on average), {result.seconds:.2f} s "
                     f"({n / result.seconds:.1f} images/s){scored} -> {out}")  # fmt: skip


def _agree(command: str, loaded: Any = None, recipe: Any = None, **settings: Any) -> None:
    """Under torchrun, refuse a run whose ranks do not share the command, the weights (``loaded``), the recipe's
    fields and ``settings`` (exit 2 naming what differs); nothing outside a process group."""
    if not _under_torchrun():
        return
    from .. import __version__, distributed

    record = {"command": command, "hasten": __version__, **settings}
    if loaded is not None:
        record |= {"model": loaded.info.name, "fingerprint": loaded.fingerprint}
    if recipe is not None:
        record |= {f"recipe.{key}": value for key, value in recipe.to_dict().items()}
    try:
        distributed.agree(record, "settings")
    except distributed.MismatchError as err:
        _fail(str(err))


def _check_writable(path: pathlib.Path, flag: str) -> None:
    """Refuse an output path that cannot be written, before any work: a folder, or a file in a missing or
    read-only folder."""
    import os

    if path.is_dir():
        _fail(f"{flag} {path} is a folder; give a file path")
    parent = path.parent if str(path.parent) else pathlib.Path(".")
    if not parent.is_dir():
        _fail(f"{flag} {path}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        _fail(f"{flag} {path} is not writable")


def _check_device(device: str) -> str:
    """Refuse a device this torch cannot use, before any work (``torch.device`` alone accepts "cuda" anywhere);
    the device this process uses: under torchrun, ``cuda`` is ``cuda:LOCAL_RANK`` (one GPU per process)."""
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        _fail(f"--device {device!r} is not a device; use cpu or cuda (cuda:N for another GPU)")
    if kind == "cuda" and not torch.cuda.is_available():
        _fail(f"--device {device}: this torch ({torch.__version__}) sees no CUDA GPU; use --device cpu")
    if not _under_torchrun():
        return device
    from .. import distributed

    return str(distributed.device_for(device))


def _check_output_folder(out: pathlib.Path, flag: str, *, force: bool, sources: tuple[Any, ...] = ()) -> None:
    """Refuse a folder output that would overwrite something, before any work: a file, a folder the command reads
    from, or a folder that already holds files (unless --force); the parent must be writable."""
    import os

    if out.exists() and not out.is_dir():
        _fail(f"{flag} {out} is a file; give a folder path")
    for source in sources:
        if source is not None and pathlib.Path(source).exists() and pathlib.Path(source).resolve() == out.resolve():
            _fail(f"{flag} {out} is the model folder being read; write to another folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        _fail(f"{flag} {out} already holds files; pass --force to replace what this command writes there, or use "
              "another folder")  # fmt: skip
    existing = out if out.is_dir() else next((p for p in out.parents if p.exists()), pathlib.Path("."))
    if not existing.is_dir():
        _fail(f"{flag} {out} cannot be made: {existing} is a file")
    if not os.access(existing, os.W_OK):
        _fail(f"{flag} {out} is not writable ({existing} is read-only)")


def _check_guidance(guidance: float | None) -> None:
    """Refuse a guidance scale that cannot mean anything: NaN, infinite or negative (0 is unconditional)."""
    import math

    if guidance is not None and not 0 <= guidance < math.inf:
        _fail(f"--guidance must be a finite number >= 0 (1 = no guidance, 0 = unconditional), got {guidance:g}")


def _non_finite(err: Exception, guidance: float | None) -> str:
    """The message for a sampler that produced NaN/inf, with the likely cause."""
    if guidance is not None and abs(guidance) > 20:
        return (f"{err}; the guidance scale {guidance:g} is the likely cause (it multiplies the difference between "
                "the conditional and unconditional predictions): try a scale below 20")  # fmt: skip
    return f"{err}; the model diverged on this sampler: try more steps, another solver or a smaller guidance scale"


@app.command()
def edit(
    images: Annotated[
        pathlib.Path,
        typer.Option(
            help=".npz with samples [N, C, H, W] in [0, 1] (and labels for a class-conditional model), "
            "as `hasten sample --save` writes"
        ),
    ],
    save: Annotated[pathlib.Path, typer.Option(help=".npz to write: the edited samples and their labels")],
    model: Annotated[
        str | None, typer.Option(help="bundled model name or a model folder [default: mnist-unet]")
    ] = None,
    to_label: Annotated[
        int | None, typer.Option(help="target class for every image [default: the source labels: reconstruction]")
    ] = None,
    method: Annotated[
        str, typer.Option(help="ddpm-inversion (exact), cyclediffusion (exact) or ddim-inversion (approximate)")
    ] = "ddpm-inversion",
    steps: Annotated[int, typer.Option(min=1, help="sampler steps (the grid of the inversion and the edit)")] = 50,
    schedule: Annotated[str, typer.Option(help="discretisation (as in `hasten sample`)")] = "auto",
    skip: Annotated[
        int, typer.Option(min=0, help="start the edit this many steps into the grid (keeps more of the source)")
    ] = 0,
    eta: Annotated[
        float | None,
        typer.Option(
            help="noise fraction of the stochastic methods' sampler [default: 1 for ddpm-inversion, 0.1 for "
            "cyclediffusion]"
        ),
    ] = None,
    guidance: Annotated[float | None, typer.Option(help="guidance while editing [default: the model's]")] = None,
    source_guidance: Annotated[
        float | None, typer.Option(help="guidance while inverting [default: the model's]")
    ] = None,
    seed: Annotated[int, typer.Option(help="seed of the inversion's noise draws")] = 0,
    batch_size: SampleBatchOption = 256,
    out: Annotated[pathlib.Path | None, typer.Option(help="PNG grid: sources above, edits below")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    pipeline: PipelineOption = None,
    prompt: PromptOption = None,
    to_prompt: Annotated[list[str] | None, typer.Option(help="--pipeline: the target prompt (repeatable)")] = None,
    negative_prompt: NegativePromptOption = None,
    prompt_embeds: PromptEmbedsOption = None,
    to_prompt_embeds: Annotated[
        pathlib.Path | None, typer.Option(help="--pipeline: safetensors of the encoded target prompts")
    ] = None,
    class_label: ClassLabelOption = None,
    to_class_label: Annotated[
        list[int] | None, typer.Option(help="--pipeline (DiT): the target class (repeatable)")
    ] = None,
    height: HeightOption = None,
    width: WidthOption = None,
    allow_pickle: AllowPickleOption = False,
    fmt: FormatOption = OutputFormat.text,
) -> None:
    """Invert images into a model's noise space and sample them under another class (or, with --pipeline, another
    prompt). With the source condition the stochastic methods give the images back exactly; the PSNR to the
    source is printed either way."""
    import numpy as np
    import torch

    from .._io import atomic_path
    from ..editing import ENCODERS, invert
    from ..editing import edit as run_edit
    from ..viz import save_grid

    _check_writable(save, "--save")
    if out is not None:
        _check_writable(out, "--out")
    device = _check_device(device)
    _check_guidance(guidance)
    _check_guidance(source_guidance)
    if method not in ENCODERS:
        _fail(f"--method {method!r} is unknown; allowed: {', '.join(ENCODERS)}")
    targets = {"--to-prompt": to_prompt, "--to-prompt-embeds": to_prompt_embeds, "--to-class-label": to_class_label}
    if pipeline is None and any(v is not None for v in targets.values()):
        _fail(f"{', '.join(k for k, v in targets.items() if v is not None)} go with --pipeline DIR (a bundled "
              "model's target is --to-label)")  # fmt: skip
    if pipeline is not None and model is not None:
        _fail("give --model or --pipeline, not both")
    if pipeline is not None and to_label is not None:
        _fail("--to-label is a bundled model's class; a pipeline's target is --to-prompt, --to-prompt-embeds or "
              "--to-class-label")  # fmt: skip
    if not images.is_file():
        _fail(f"--images {images}: no such file")
    try:
        with np.load(images, allow_pickle=False) as data:
            if "samples" not in data:
                _fail(f"--images {images} has no 'samples' array (keys: {', '.join(data.files) or 'none'})")
            pixels = torch.from_numpy(np.asarray(data["samples"], dtype=np.float32))
            labels = torch.from_numpy(np.asarray(data["labels"]).astype(np.int64)) if "labels" in data else None
    except (OSError, ValueError) as err:
        _fail(f"--images {images}: not a readable .npz ({err})")
    source = _pipeline_source(
        pipeline, prompt, negative_prompt, prompt_embeds, class_label, height, width, allow_pickle=allow_pickle
    )
    try:
        if source is None:
            from ..models.zoo import load

            loaded = load(model or "mnist-unet", device=device)
            target = loaded
        else:
            loaded = source.load(device=device)
            target = _edit_target(loaded, source, to_prompt, to_prompt_embeds, to_class_label)
            labels = None  # a pipeline's condition is its prompt
        inversion_labels = labels if loaded.info.num_classes else None
        if loaded.info.num_classes and labels is None:
            _fail(f"{loaded.info.name} is class-conditional: --images needs a 'labels' array (one per image)")
        # inverted under the source condition (labels, or the source prompt), replayed under the target's
        inversion = invert(
            loaded, pixels, labels=inversion_labels, method=method, steps=steps, schedule=schedule, eta=eta,
            guidance=source_guidance, seed=seed, batch_size=batch_size,
        )  # fmt: skip
        result = run_edit(target, inversion, to_label=to_label, skip=skip, guidance=guidance, batch_size=batch_size)
    except FloatingPointError as err:
        _fail(_non_finite(err, guidance))
    except (FileNotFoundError, KeyError, TypeError, ValueError, RuntimeError) as err:
        _fail(str(err.args[0]) if err.args else str(err))
    edited = result.images01
    mse = ((edited.double() - pixels.double()) ** 2).flatten(1).mean(dim=1)
    psnr = float((10 * torch.log10(1.0 / mse.clamp_min(1e-20))).mean())
    with atomic_path(save) as tmp, open(tmp, "wb") as fh:  # a file object: numpy adds no ".npz"
        arrays = {"samples": edited.numpy().astype(np.float32)}
        if result.labels is not None:
            arrays["labels"] = result.labels.numpy().astype(np.int64)
        np.savez_compressed(fh, **arrays)
    if out is not None:
        columns = min(len(pixels), 16)
        save_grid(torch.cat([pixels[:columns], edited[:columns]]), out, nrow=columns)
    data = {
        "model": loaded.info.name, "method": method, "steps": steps, "schedule": schedule, "skip": skip, "eta": eta,
        "n": len(pixels), "to_label": to_label, "guidance": guidance, "source_guidance": source_guidance,
        "seed": seed, "nfe_inversion": steps, "nfe_edit": result.nfe, "seconds_edit": result.seconds,
        "psnr_to_source": psnr, "save": str(save), "out": None if out is None else str(out),
    }  # fmt: skip
    target_text = "" if to_label is None else f" to label {to_label}"
    _emit(fmt, data, f"{loaded.info.name}: {len(pixels)} images edited{target_text} with {method} ({steps} steps, "
                     f"skip {skip}), {result.nfe} NFE, {result.seconds:.2f} s; PSNR to the source {psnr:.1f} dB "
                     f"-> {save}")  # fmt: skip


def _edit_target(loaded: Any, source: Any, to_prompt: Any, to_prompt_embeds: Any, to_class_label: Any) -> Any:
    """The pipeline model of an edit's target condition: the same pipeline, conditioned on the --to-* options."""
    from ..pipelines import from_pipeline

    given = [v for v in (to_prompt, to_prompt_embeds, to_class_label) if v]
    if len(given) != 1:
        _fail("--pipeline edits need exactly one target: --to-prompt, --to-prompt-embeds or --to-class-label")
    tensors: dict[str, Any] = {}
    if to_prompt_embeds is not None:
        from safetensors.torch import load_file

        from ..bench.matrix import PIPELINE_EMBEDS

        if not to_prompt_embeds.is_file():
            _fail(f"--to-prompt-embeds {to_prompt_embeds}: no such file")
        tensors = load_file(str(to_prompt_embeds))
        unknown = sorted(set(tensors) - set(PIPELINE_EMBEDS))
        if unknown:
            _fail(f"--to-prompt-embeds: unknown tensors {unknown}; allowed: {', '.join(PIPELINE_EMBEDS)}")
    return from_pipeline(
        loaded.pipeline, prompt=list(to_prompt) if to_prompt else None, negative_prompt=source.negative_prompt,
        class_labels=list(to_class_label) if to_class_label else None, guidance=source.guidance, height=source.height,
        width=source.width, name=loaded.info.name, **tensors,
    )  # fmt: skip


@app.command()
def evaluate(
    model: ModelOption = "mnist-dit",
    solver: Annotated[
        str | None,
        typer.Option(help="solver name, options after a colon [default: the model's own sampler, else dpmpp_2m]"),
    ] = None,
    steps: Annotated[
        int | None, typer.Option(min=1, help="solver steps [default: the model's own sampler's, else 20]")
    ] = None,
    n: Annotated[int, typer.Option("--n", "--num-samples", min=10, help="number of samples")] = 1000,
    batch_size: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="images per network batch [default: even batches of at most 256]; under torchrun each process "
            "samples whole batches, so keep it fixed to reproduce a run",
        ),
    ] = None,
    seed: SeedOption = 0,
    guidance: Annotated[
        float | None, typer.Option(help="classifier-free guidance scale [default: the model's sampler's, else 1]")
    ] = None,
    schedule: Annotated[
        str | None, typer.Option(help="discretisation [default: the model's own sampler's, else auto]")
    ] = None,
    reference: Annotated[bool, typer.Option(help="also measure RMSE/PSNR to a cached high-accuracy solve")] = True,
    out: Annotated[pathlib.Path | None, typer.Option(help="write a PNG grid of the first 100 samples")] = None,
    fmt: FormatOption = OutputFormat.text,
) -> None:
    """Measure quality (FD, precision/recall, confidence, memorisation), reference error and cost. With no
    sampler flag a model that declares its own sampler (a distilled student) is measured at it; its reference
    error is then to its own converged solve (`hasten bench --student` measures it against its teacher's)."""
    from ..evaluate import evaluate_model
    from ..generate import resolve_sampler
    from ..models.zoo import load
    from ..solvers import parse_solver
    from ..viz import save_grid

    if out is not None:
        _check_writable(out, "--out")
    _check_guidance(guidance)
    try:
        solver_name, solver_options = (None, {}) if solver is None else parse_solver(solver)
        loaded = load(model)
        if not (loaded.default_sampler and solver is None and steps is None and schedule is None):
            steps = 20 if steps is None else steps  # evaluate's default step count, where the library's is 10
        solver_name, steps, schedule, solver_options, guidance = resolve_sampler(
            loaded, solver_name, steps, schedule, solver_options, guidance
        )
        guidance = 1.0 if guidance is None else guidance
        _agree("evaluate", loaded, None, solver=solver_name, steps=steps, schedule=schedule, options=solver_options,
               guidance=guidance, n=n, seed=seed, reference=reference, batch_size=batch_size)  # fmt: skip
        result = evaluate_model(
            loaded,
            n=n,
            solver=solver_name,
            steps=steps,
            schedule=schedule,
            seed=seed,
            guidance=guidance,
            reference=reference,
            batch_size=batch_size,
            **solver_options,
        )
    except FileNotFoundError as err:
        _fail(str(err))
    except FloatingPointError as err:
        _fail(_non_finite(err, guidance))
    except (KeyError, TypeError, ValueError) as err:
        _fail(str(err.args[0]) if err.args else str(err))
    images, rows = result.pop("images01"), range(*result.pop("rows"))
    if out is not None:  # the first 100 samples, from the processes holding them (all, in one process)
        from .. import distributed

        first = distributed.gather_rows(images[: max(0, min(len(images), 100 - rows.start))])
        save_grid(first, out, nrow=10)
    text = "\n".join(f"{k:>18}: {v}" for k, v in result.items())
    _emit(fmt, result, text)


@app.command()
def bench(
    model: ModelOption = "mnist-dit",
    preset: Annotated[
        str,
        typer.Option(
            help="quick (minutes on a CPU), tuning (5/8/10 NFE, for --plan), caching (--accel), "
            "quantization (--quant), distill (1/2/4 NFE, for --student), standard or full"
        ),
    ] = "quick",
    out: Annotated[pathlib.Path, typer.Option(help="results folder")] = pathlib.Path("bench-out"),
    resume: Annotated[bool, typer.Option(help="continue an interrupted run in --out")] = False,
    n: Annotated[
        int | None, typer.Option("--n", "--num-samples", help="override the preset's samples per configuration")
    ] = None,
    solver: Annotated[
        list[str] | None,
        typer.Option(help="override the preset's solvers: a solver spec (repeatable), e.g. unipc:variant=bh1"),
    ] = None,
    steps: Annotated[list[int] | None, typer.Option(help="override the preset's step counts (repeatable)")] = None,
    peer: Annotated[
        list[str] | None,
        typer.Option(help="override the preset's diffusers peers (repeatable; `none` for no peer rows)"),
    ] = None,
    plan: Annotated[list[pathlib.Path] | None, typer.Option(help="a plan from `hasten tune` (repeatable)")] = None,
    accel: Annotated[
        list[pathlib.Path] | None,
        typer.Option(help="a cache config from `hasten accelerate calibrate` (repeatable): cached, uncached, peers"),
    ] = None,
    quant: Annotated[
        list[pathlib.Path] | None,
        typer.Option(help="a quantised model folder from `hasten quantize` (repeatable): quantised, float, torchao"),
    ] = None,
    recipe: Annotated[
        list[pathlib.Path] | None,
        typer.Option(help="a recipe file, e.g. from `hasten optimize` (repeatable): one row, at the bench's seed"),
    ] = None,
    student: Annotated[
        list[str] | None,
        typer.Option(
            help="a distilled student of --model (`hasten distill` folder or bundled name; repeatable): one "
            "row at its own sampler, with its training cost"
        ),
    ] = None,
    force_student: Annotated[
        bool, typer.Option(help="bench a --student distilled from other weights than --model's all the same")
    ] = False,
    pipeline: PipelineOption = None,
    prompt: PromptOption = None,
    negative_prompt: NegativePromptOption = None,
    prompt_embeds: PromptEmbedsOption = None,
    class_label: ClassLabelOption = None,
    height: HeightOption = None,
    width: WidthOption = None,
    allow_pickle: AllowPickleOption = False,
    guidance: Annotated[float | None, typer.Option(help="--pipeline: guidance scale (default: the pipeline's)")] = None,
    shard: Annotated[
        str,
        typer.Option(
            help="under torchrun: rows (each process measures whole rows), samples (every row's samples split by "
            "index) or auto (rows while there are as many rows left as processes)"
        ),
    ] = "auto",
    fmt: FormatOption = OutputFormat.text,
) -> None:
    """Every configuration against the diffusers peers, from the same noise; JSONL + HTML report."""
    import dataclasses
    import time

    from ..bench.matrix import PRESETS
    from ..bench.report import render
    from ..bench.runner import SHARDS, BenchError, run_bench

    if preset not in PRESETS:
        _fail(f"unknown preset {preset!r}; available: {', '.join(PRESETS)}")
    if shard not in SHARDS:
        _fail(f"--shard must be one of {', '.join(SHARDS)}, got {shard!r}")
    _check_output_folder(out, "--out", force=True)  # a folder of results is bench's own to refuse or resume
    from ..tune.plan import PlanError

    extra: dict[str, Any] = {"n": n} if n is not None else {}
    if solver:
        extra["solvers"] = tuple(solver)
    if steps:
        extra["steps"] = tuple(steps)
    if peer:
        if "none" in peer and len(peer) > 1:
            _fail(f"--peer none means no peer rows; do not name others with it, got {', '.join(peer)}")
        extra["peers"] = () if peer == ["none"] else tuple(peer)
        extra["strict_peers"] = True
    from ..discrete import is_masked_folder

    if pipeline is None and is_masked_folder(model):  # a masked model: its discrete samplers at call budgets
        from ..bench.masked import MASKED_SOLVERS, MASKED_STEPS

        if preset not in MASKED_STEPS:
            _fail(f"--preset {preset} measures continuous samplers; a masked model takes {', '.join(MASKED_STEPS)}")
        extra.setdefault("solvers", MASKED_SOLVERS)
        extra.setdefault("steps", MASKED_STEPS[preset])
        extra["schedules"] = ("auto",)
        extra.setdefault("peers", ())
    if pipeline is None and guidance is not None:
        _fail("--guidance goes with --pipeline DIR (bundled models take the preset's guidance scales)")
    _check_guidance(guidance)
    source = _pipeline_source(
        pipeline, prompt, negative_prompt, prompt_embeds, class_label, height, width, guidance, allow_pickle
    )
    if source is not None:
        extra["pipeline"] = source
    try:
        config = dataclasses.replace(
            PRESETS[preset],
            model=model,
            plans=tuple(map(str, plan or ())),
            accels=tuple(map(str, accel or ())),
            quants=tuple(map(str, quant or ())),
            recipes=tuple(map(str, recipe or ())),
            students=tuple(student or ()),
            force_students=force_student,
            **extra,
        )
    except (FileNotFoundError, PlanError, ValueError, TypeError) as err:
        _fail(str(err))
    started = time.perf_counter()

    def on_row(row, i, total):
        if fmt is OutputFormat.text and _is_main():
            fd = "–" if row.get("fd") is None else f"{row['fd']:.1f}"
            error = "–" if row.get("rmse_ref") is None else f"{row['rmse_ref']:.4f}"
            typer.echo(f"[{i}/{total}] {row['label']}: NFE {row['nfe']}, {row['seconds']:.2f} s, FD {fd}, "
                       f"RMSE {error}", err=True)  # fmt: skip

    try:
        _agree("bench", config=config.to_dict(), resume=resume, shard=shard)
        rows = run_bench(config, out, resume=resume, on_row=on_row, shard=shard)
    except FileNotFoundError as err:
        _fail(str(err))
    except (BenchError, KeyError, TypeError, ValueError) as err:
        _fail(str(err.args[0]) if err.args else str(err))
    if not _is_main():  # rank 0 renders and reports
        return
    report = render(out)
    wall = time.perf_counter() - started
    if fmt is OutputFormat.json:
        typer.echo(json.dumps({"out": str(out), "report": str(report), "rows": len(rows), "wall_seconds": wall}))
        return
    _print_table(rows)
    typer.echo(f"{len(rows)} rows in {out / 'results.jsonl'}; report {report} ({wall:.0f} s)")


@app.command()
def report(
    folder: Annotated[pathlib.Path, typer.Argument(help="a hasten bench output folder")],
    fmt: FormatOption = OutputFormat.text,
) -> None:
    """Re-render the plots and report.html of a bench folder from its results.jsonl."""
    from ..bench.report import render
    from ..bench.runner import read_results

    try:
        path = render(folder)
        rows = read_results(folder)
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err))
    if fmt is OutputFormat.json:
        typer.echo(json.dumps({"report": str(path), "rows": len(rows)}))
        return
    _print_table(rows)
    typer.echo(f"report: {path}")


def _print_table(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from ..recipe import training_cost

    table = Table(title="hasten bench")
    students = any(r.get("training") for r in rows)  # distilled students: their training cost beside them
    for header in ("configuration", "NFE", "seconds", "FD", "precision", "recall", "RMSE ref"):
        table.add_column(header, justify="left" if header == "configuration" else "right")
    if students:
        table.add_column("training", justify="left")

    def cell(v, spec):
        return "–" if v is None else format(v, spec)

    for r in rows:
        cells = [
            escape(r["label"]), str(r["nfe"]), cell(r.get("seconds"), ".2f"), cell(r.get("fd"), ".1f"),
            cell(r.get("precision"), ".3f"), cell(r.get("recall"), ".3f"), cell(r.get("rmse_ref"), ".4f"),
        ]  # fmt: skip
        if students:
            cells.append(escape(training_cost(r["training"])) if r.get("training") else "–")
        table.add_row(*cells)
    Console(stderr=False).print(table)


class Arch(str, Enum):
    unet = "unet"
    dit = "dit"


class Objective(str, Enum):
    eps = "eps"
    v = "v"
    flow = "flow"
    mdlm = "mdlm"


@app.command()
def tune(
    model: ModelOption = "mnist-dit",
    nfe: Annotated[int, typer.Option(help="exact denoiser calls per sample (>= 2)")] = 5,
    minutes: Annotated[float, typer.Option(help="search budget (evaluation time; resumes count earlier time)")] = 10.0,
    out: Annotated[pathlib.Path, typer.Option(help="plan file to write (JSON)")] = pathlib.Path("plan.json"),
    guidance: Annotated[
        float | None, typer.Option(help="classifier-free guidance scale (default: 1 = none, or the pipeline's)")
    ] = None,
    n_search: Annotated[int, typer.Option(help="images per search evaluation")] = 64,
    n_fd: Annotated[int, typer.Option(help="images per FD evaluation in the full-objective stage")] = 200,
    fd_candidates: Annotated[int, typer.Option(help="candidates scored by FD at the end (0: proxy only)")] = 6,
    n_heldout: Annotated[int, typer.Option(help="images for the held-out scores (seed 0, as hasten bench)")] = 100,
    reference_steps: Annotated[int, typer.Option(help="steps of the reference solve errors are measured to")] = 100,
    resume: Annotated[bool, typer.Option(help="continue the search saved beside --out")] = False,
    seed: Annotated[int, typer.Option(help="seed of the search's random choices")] = 0,
    v3: Annotated[
        bool, typer.Option(help="include DPM-Solver-v3 (its statistics are estimated once per model, minutes)")
    ] = True,
    fit_iterations: Annotated[
        int,
        typer.Option(
            help="then fit multistep weights and levels to the reference from the plan's grid (0: no fit; ~0.6 s "
            "per iteration for mnist-dit at NFE 5 on 2 CPU cores; 600-800 recommended)"
        ),
    ] = 0,
    fit_lr: Annotated[float, typer.Option(help="learning rate of the fit (Adam; its first)")] = 0.01,
    fit_lr_schedule: Annotated[
        str, typer.Option(help="cosine (decays to 5% of --fit-lr at the last iteration) or constant")
    ] = "cosine",
    n_fit: Annotated[int, typer.Option(help="training images of the fit (search seed)")] = 128,
    skip_cost: Annotated[
        float | None,
        typer.Option(
            help="also search which blocks each step skips (per-step architecture): --nfe steps within this "
            "NFE-equivalent cost (FLOP-weighted, < --nfe)"
        ),
    ] = None,
    student: Annotated[
        str | None,
        typer.Option(
            help="a pruned or distilled student of --model (bundled name or folder) that runs some steps in its "
            "place (per-step model assembly); needs --student-cost"
        ),
    ] = None,
    student_cost: Annotated[
        float | None,
        typer.Option(
            help="the assembled plan's largest NFE-equivalent cost (student calls count their FLOP share; < --nfe): "
            "decides how many steps the student runs"
        ),
    ] = None,
    pipeline: PipelineOption = None,
    prompt: PromptOption = None,
    negative_prompt: NegativePromptOption = None,
    prompt_embeds: PromptEmbedsOption = None,
    class_label: ClassLabelOption = None,
    height: HeightOption = None,
    width: WidthOption = None,
    allow_pickle: AllowPickleOption = False,
    fmt: FormatOption = OutputFormat.text,
) -> None:
    """Search a sampling plan (grid + per-step solver decisions) for a model at an exact NFE."""
    from ..models.zoo import load
    from ..tune import TuneConfig, TuneError
    from ..tune import tune as run_tune

    _check_writable(out, "--out")
    _check_guidance(guidance)
    source = _pipeline_source(
        pipeline, prompt, negative_prompt, prompt_embeds, class_label, height, width, allow_pickle=allow_pickle
    )
    try:
        loaded = load(model) if source is None else source.load()
        config = TuneConfig(
            nfe=nfe, minutes=minutes, guidance=loaded.default_guidance if guidance is None else guidance,
            n_search=n_search, seed=seed, use_v3=v3, n_fd=n_fd, fd_candidates=fd_candidates, n_heldout=n_heldout,
            reference_steps=reference_steps, fit_iterations=fit_iterations, fit_lr=fit_lr,
            fit_lr_schedule=fit_lr_schedule, n_fit=n_fit, skip_cost=skip_cost, student=student,
            student_cost=student_cost,
        )  # fmt: skip
        plan = run_tune(loaded, config, out, resume=resume, progress=fmt is OutputFormat.text and sys.stderr.isatty())
    except (FileNotFoundError, TuneError, ValueError) as err:
        _fail(str(err))
    recipe_file = _write_recipe_beside(
        out, loaded, plan=plan, provenance={"made_by": "hasten tune", "plan_file": str(out)}
    )
    held, base = plan.scores["heldout"], plan.scores["baseline"]
    data = {
        "out": str(out), "recipe": recipe_file, "model": loaded.info.name, "nfe": plan.nfe, "plan": plan.describe(),
        **plan.scores, "evaluations": plan.search["evaluations"],
        "evaluation_seconds": plan.search["evaluation_seconds"],
    }  # fmt: skip
    fd = f", FD {held['fd']:.1f} vs {base['heldout']['fd']:.1f}" if "fd" in held else ""
    fit = plan.search.get("fit")
    if fit:
        fd += (f"; fit: validation RMSE {fit['validation_rmse']:.4f} (iteration {fit['best_iteration']}) vs the "
               f"plan's {fit['plan_validation_rmse']:.4f}, kept the {fit['kept']}")  # fmt: skip
    assembly = plan.search.get("assembly")
    if assembly:  # the stock start costs the full NFE: say what the student's steps cost and saved
        fd += (f"; the student at steps {','.join(map(str, plan.assembly.steps))}: without it (cost {plan.nfe}) "
               f"held-out RMSE {assembly['heldout_without_student']['rmse_ref']:.4f}")  # fmt: skip
    cost = "" if plan.cost is None else f" (cost {plan.cost:.2f} NFE-equivalents)"
    _emit(
        fmt,
        data,
        f"{loaded.info.name} at NFE {plan.nfe}{cost}: held-out RMSE to reference {held['rmse_ref']:.4f} vs "
        f"{base['heldout']['rmse_ref']:.4f} for {base['label']} (cost {plan.nfe}), the best stock start on the "
        f"search noise{fd} "
        f"({plan.search['evaluations']} evaluations; every stock configuration beside it: hasten bench --preset "
        f"tuning --plan {out}, same model) -> {out}{f' (recipe: {recipe_file})' if recipe_file else ''}\n"
        f"{plan.describe()}",
    )


@app.command()
def quantize(
    model: ModelOption = "mnist-unet",
    weights: Annotated[int, typer.Option(help="weight bits: 8 or 4 (per output channel)")] = 8,
    activations: Annotated[int, typer.Option(help="activation bits: 8, or 16 to keep float activations")] = 8,
    out: Annotated[pathlib.Path, typer.Option(help="folder to write: a model `hasten sample --model` loads")] = (
        pathlib.Path("quantized")
    ),
    calibration: Annotated[
        str, typer.Option(help="trajectory (every step, Q-Diffusion), normal (PTQ4DM), single (middle step only)")
    ] = "trajectory",
    n: Annotated[int, typer.Option("--n", "--num-samples", help="calibration images (trajectories)")] = 128,
    solver: SolverSpecOption = "dpmpp_2m",
    steps: Annotated[int, typer.Option(min=1, help="solver steps of the calibration trajectories")] = 20,
    guidance: GuidanceOption = 1.0,
    force: Annotated[bool, typer.Option(help="replace the files of an --out folder that already holds some")] = False,
    per_step: Annotated[bool, typer.Option(help="activation ranges per time step (TFMQ-DM finite-set)")] = True,
    split: Annotated[bool, typer.Option(help="split quantisation of UNet shortcut concatenations")] = True,
    reconstruct: Annotated[str, typer.Option(help="none, or adaround (learned rounding: slower, better)")] = "none",
    fmt: FormatOption = OutputFormat.text,
) -> None:
    """Time-step-aware post-training quantisation: integer weights on disk, int8 kernels where the CPU has them."""
    from ..models.zoo import load
    from ..quant import QuantConfig, quantize_to_folder
    from ..solvers import get_solver, parse_solver

    if activations not in (8, 16):
        _fail(f"--activations must be 8 (uint8) or 16 (float activations, weight-only), got {activations}")
    if weights not in (4, 8):
        _fail(f"--weights must be 8 or 4, got {weights}")
    _check_guidance(guidance)
    _check_output_folder(out, "--out", force=force, sources=(model,))
    try:
        solver_name, solver_options = parse_solver(solver)
        get_solver(solver_name, **solver_options)  # an unknown solver or option fails now, not after loading
        config = QuantConfig(
            weights=weights, activations=None if activations == 16 else activations, per_step=per_step,
            split_shortcut=split, reconstruct=reconstruct,
        )  # fmt: skip
        loaded = load(model)
        in_place = loaded.folder is not None and loaded.folder.resolve() == out.resolve()
        if in_place:  # a bundled model named by name (a folder given as --model was refused above)
            raise ValueError(f"--out {out} is the model folder being read; write to another folder")
        record = quantize_to_folder(loaded, config, out, n=n, mode=calibration, solver=solver_name, steps=steps,
                                    guidance=guidance, progress=fmt is OutputFormat.text,
                                    solver_options=solver_options)  # fmt: skip
    except (FileNotFoundError, ValueError, TypeError, RuntimeError) as err:
        _fail(str(err.args[0]) if err.args else str(err))
    except KeyError as err:
        _fail(str(err.args[0]) if err.args else str(err))

    record["recipe"] = _write_recipe_beside(
        pathlib.Path(record["out"]), load(record["out"]), solver=solver_name, options=solver_options, steps=steps,
        guidance=guidance, provenance={"made_by": "hasten quantize", "calibration": record["calibration"]},
    )  # fmt: skip
    kernels = sum(n for path, n in record["execution"].items() if path != "simulated")
    layers = sum(record["execution"].values())
    _emit(
        fmt,
        record,
        f"{config.label}: {record['bytes'] / 1e6:.2f} MB on disk ({record['size_ratio']:.2f}x of "
        f"{record['source']['bytes'] / 1e6:.2f} MB), network output SQNR {record['network_sqnr_db']:.1f} dB, "
        f"{kernels} of {layers} layers on integer kernels here -> {record['out']}",
    )


accelerate_app = typer.Typer(
    no_args_is_help=True, help="Feature caching and early exit: calibrate to a quality target, train exit heads."
)
app.add_typer(accelerate_app, name="accelerate")


@accelerate_app.command("calibrate")
def accelerate_calibrate(
    model: ModelOption = "mnist-unet",
    technique: Annotated[
        str | None,
        typer.Option(
            help="deepcache (UNets); block_cache, first_block_cache, ras, early_exit (transformers); default: all"
        ),
    ] = None,
    exit_heads: Annotated[
        pathlib.Path | None,
        typer.Option(help="exit heads (from `hasten accelerate train-exits`): needed by --technique early_exit"),
    ] = None,
    solver: SolverSpecOption = "dpmpp_2m",
    steps: StepsOption = 20,
    plan: Annotated[
        pathlib.Path | None,
        typer.Option(help="calibrate for this tuned plan (from `hasten tune`) instead of --solver/--steps"),
    ] = None,
    guidance: Annotated[
        float | None, typer.Option(help="classifier-free guidance scale (default: 1 = none, or the pipeline's)")
    ] = None,
    max_quality_loss: Annotated[
        float, typer.Option(help="largest relative FD increase over the uncached run (0.05 = 5%)")
    ] = 0.05,
    max_rmse: Annotated[
        float | None, typer.Option(help="bound the RMSE to the uncached images (the only budget for --pipeline)")
    ] = None,
    n: Annotated[
        int, typer.Option("--n", "--num-samples", min=10, help="images per evaluation (calibration and held-out noise)")
    ] = 200,
    out: Annotated[pathlib.Path, typer.Option(help="config file to write (one per technique if several)")] = (
        pathlib.Path("accel.json")
    ),
    pipeline: PipelineOption = None,
    prompt: PromptOption = None,
    negative_prompt: NegativePromptOption = None,
    prompt_embeds: PromptEmbedsOption = None,
    class_label: ClassLabelOption = None,
    height: HeightOption = None,
    width: WidthOption = None,
    allow_pickle: AllowPickleOption = False,
    fmt: FormatOption = OutputFormat.text,
) -> None:
    """Find the fastest cache setting whose FD loss against the uncached run stays within the target.

    Writes the config (for `hasten sample --accel`) when a setting meets the target, and always writes the
    full calibration record to OUT with `.calibration.json` appended. Exits with status 3 when no setting of
    any technique meets the target (nothing harmful is written).
    """
    from .._io import write_text_atomic
    from ..accel.calibrate import calibrate, techniques_for
    from ..models.zoo import load
    from ..recipe import Recipe, RecipeError
    from ..solvers import parse_solver
    from ..tune.plan import PlanError

    _check_writable(out, "--out")
    _check_guidance(guidance)
    source = _pipeline_source(
        pipeline, prompt, negative_prompt, prompt_embeds, class_label, height, width, allow_pickle=allow_pickle
    )
    try:
        if plan is not None and (solver, steps) != ("dpmpp_2m", 20):
            _fail("--plan supplies the solver and the steps; drop --solver/--steps")
        solver_name, solver_options = parse_solver(solver)
        loaded = load(model) if source is None else source.load()
        guidance = loaded.default_guidance if guidance is None else guidance
        base = Recipe.from_files(loaded, plan=plan, solver=solver_name, options=solver_options, steps=steps,
                                 guidance=guidance)  # fmt: skip
        names = [technique] if technique is not None else techniques_for(loaded.network, exit_heads=exit_heads)
        if not names:
            _fail(f"no caching technique can hook {type(loaded.network).__name__}")
    except (FileNotFoundError, PlanError, RecipeError, ValueError, TypeError) as err:
        _fail(str(err))
    except KeyError as err:
        _fail(str(err.args[0]) if err.args else str(err))
    results, lines = [], []
    for name in names:
        target = out if len(names) == 1 else out.with_name(f"{out.stem}.{name}{out.suffix}")

        def show(row: dict[str, Any], name: str = name) -> None:
            if fmt is OutputFormat.text:
                where = "held-out" if row.get("heldout") else "calibration"
                typer.echo(
                    f"  {name} {where}: {_accel_label(row['config'])}: {_fd_change(row)}RMSE "
                    f"{row['rmse_to_uncached']:.4f}, {row['saved_fraction']:.0%} of the work skipped: "
                    f"{'pass' if row['passed'] else 'fail'}",
                    err=True,
                )

        try:
            found = calibrate(
                loaded, name, recipe=base, max_quality_loss=max_quality_loss, max_rmse=max_rmse, n=n, on_row=show,
                exit_heads=exit_heads,
            )  # fmt: skip
        except FloatingPointError as err:
            _fail(_non_finite(err, guidance))
        except (FileNotFoundError, ValueError, TypeError) as err:
            _fail(str(err))
        except KeyError as err:
            _fail(str(err.args[0]) if err.args else str(err))
        record = found.to_dict()
        write_text_atomic(target.with_name(target.name + ".calibration.json"), json.dumps(record, indent=2) + "\n")
        if found.config is not None:
            found.config.save(target, calibration={k: record[k] for k in ("setting", "target", "heldout", "speed")})
            record["recipe"] = _write_recipe_beside(
                target, loaded, plan=base.plan, accel=target, solver=base.solver, options=base.options,
                steps=base.steps, guidance=guidance, provenance={"made_by": "hasten accelerate calibrate"},
            )  # fmt: skip
            sp = found.speed
            lines.append(
                f"{name}: {_accel_label(record['config'])} skips {found.heldout['saved_fraction']:.0%} of the work, "
                f"{sp['speedup']:.2f}x wall clock ({sp['seconds_uncached']:.2f} s -> {sp['seconds_cached']:.2f} s), "
                f"held-out {_fd_change(found.heldout)}RMSE {found.heldout['rmse_to_uncached']:.4f} -> {target}"
            )
        else:
            budget = f"a {max_quality_loss:.0%} FD loss" if found.baseline.get("fd_calibration") is not None else ""
            if max_rmse is not None:
                budget += f"{' and ' if budget else ''}an RMSE of {max_rmse:g}"
            lines.append(
                f"{name}: no setting meets {budget} at {base.describe()} ({len(found.rows)} tried); nothing "
                f"written but {target.name}.calibration.json"
            )
        results.append({"out": str(target) if found.config is not None else None, **record})
    _emit(fmt, {"results": results}, "\n".join(lines))
    if not any(r["met"] for r in results):
        raise typer.Exit(3)


@accelerate_app.command("train-exits")
def accelerate_train_exits(
    out: Annotated[pathlib.Path, typer.Option(help="exit-heads file to write (.safetensors)")],
    model: ModelOption = "mnist-dit",
    minutes: Annotated[float, typer.Option(help="total training time, across resumes")] = 15.0,
    batch_size: Annotated[int, typer.Option(min=1, help="images per step")] = 128,
    lr: Annotated[float, typer.Option(help="AdamW learning rate of the heads")] = 1e-3,
    seed: Annotated[int, typer.Option(help="seed")] = 0,
    max_steps: Annotated[int | None, typer.Option(min=1, help="stop after this many steps (smoke tests)")] = None,
    force: Annotated[bool, typer.Option(help="replace an existing OUT (and start over)")] = False,
    fmt: FormatOption = OutputFormat.text,
) -> None:
    """Train early-exit heads for a DiT model (backbone frozen); rerun the same command to resume.

    The heads are refused on any other network's weights. Use them with `hasten accelerate calibrate
    --technique early_exit --exit-heads OUT`. To train the network together with its heads (DeeDiff's
    way: exits that are far better, in a new model folder), use `hasten distill --method early_exit`.
    """
    from ..accel.early_exit import train_exit_heads
    from ..models.zoo import load

    _check_writable(out, "--out")
    if out.exists() and not force:
        _fail(f"--out {out} already exists; use another file, or --force to train again and replace it")
    if not minutes > 0:
        _fail(f"--minutes must be > 0, got {minutes:g}")
    if not lr > 0:
        _fail(f"--lr must be > 0, got {lr:g}")
    try:
        loaded = load(model)
        record = train_exit_heads(loaded, out, minutes=minutes, batch_size=batch_size, lr=lr, seed=seed,
                                  max_steps=max_steps, force=force, progress=fmt is OutputFormat.text)  # fmt: skip
    except (FileNotFoundError, TypeError, ValueError) as err:
        _fail(str(err))
    _emit(
        fmt,
        {"out": str(out), **record},
        f"trained exit heads for {record['model']}: {record['steps']} steps ({record['seconds'] / 60:.1f} min), "
        f"loss {record['final_loss_ema']:.4f} -> {out}",
    )


def _write_recipe_beside(out: pathlib.Path, loaded: Any, **fields: Any) -> str | None:
    """Write the recipe that replays what a command just wrote (``X.recipe.json`` beside a file, ``recipe.json``
    in a folder); None for a diffusers pipeline, which a recipe cannot name as a model yet."""
    from ..recipe import Recipe, recipe_path_beside, save_recipe

    if loaded.folder is None:
        return None
    if fields.get("plan") is not None:  # the plan fixes the sampler
        for key in ("solver", "options", "steps"):
            fields.pop(key, None)
    return str(save_recipe(Recipe.from_files(loaded, **fields), recipe_path_beside(out)))


def _fd_change(row: dict[str, Any]) -> str:
    """``"FD a vs b (+x%), "``, or nothing where the model's data has no feature network (pipelines)."""
    if row.get("fd") is None:
        return ""
    return f"FD {row['fd']:.1f} vs {row['fd_uncached']:.1f} ({row['quality_loss']:+.1%}), "


def _accel_label(config: dict[str, Any]) -> str:
    """A cache config's JSON in one line, as recipes label it."""
    from ..accel import AccelConfig
    from ..recipe import cache_label

    return cache_label(AccelConfig.from_dict(config))


@app.command()
def train(
    out: Annotated[pathlib.Path, typer.Option(help="run folder (checkpoint and final model)")],
    arch: Annotated[Arch, typer.Option(help="network")] = Arch.unet,
    data: Annotated[str, typer.Option(help="mnist or emoji")] = "mnist",
    objective: Annotated[
        Objective,
        typer.Option(
            help="eps / v (DDPM schedule), flow (flow matching), or mdlm (a masked diffusion model of the images "
            "binarised at 0.5: 784 tokens of 2 values; --arch unet)"
        ),
    ] = Objective.eps,
    minutes: Annotated[float, typer.Option(help="total training time, across resumes")] = 10.0,
    batch_size: Annotated[int, typer.Option(help="images per step")] = 128,
    lr: Annotated[float, typer.Option(help="AdamW learning rate")] = 5e-4,
    ema_decay: Annotated[float, typer.Option(help="EMA decay of the exported weights")] = 0.999,
    checkpoint_minutes: Annotated[float, typer.Option(help="checkpoint interval")] = 5.0,
    seed: Annotated[int, typer.Option(help="seed")] = 0,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    max_steps: Annotated[int | None, typer.Option(min=1, help="stop after this many steps (smoke tests)")] = None,
    force: Annotated[
        bool, typer.Option(help="train into an --out folder that holds files but no checkpoint of a training run")
    ] = False,
    fmt: FormatOption = OutputFormat.text,
) -> None:
    """Train a model; rerun the same command to resume from its checkpoint."""
    from ..train import TrainConfig, find_checkpoint
    from ..train import train as run_training

    device = _check_device(device)
    if out.is_dir() and find_checkpoint(out) is not None:
        _check_output_folder(out, "--out", force=True)  # a run to resume: only a read-only folder is refused
    else:
        if (out / "hasten.json").exists() and not force:
            _fail(f"--out {out} holds a model but no training checkpoint (a model of another run, or a copy); "
                  "training would replace it: use another folder, or --force")  # fmt: skip
        _check_output_folder(out, "--out", force=force)
    if objective is Objective.mdlm:
        _train_masked(out, arch, data, minutes, batch_size, lr, ema_decay, checkpoint_minutes, seed, device,
                      max_steps, fmt)  # fmt: skip
        return
    try:
        config = TrainConfig(
            arch=arch.value,
            data=data,
            objective=objective.value,
            minutes=minutes,
            batch_size=batch_size,
            lr=lr,
            ema_decay=ema_decay,
            checkpoint_minutes=checkpoint_minutes,
            seed=seed,
        )
        result = run_training(config, out, device=device, max_steps=max_steps, progress=fmt is OutputFormat.text)
    except (KeyError, ValueError) as err:
        _fail(str(err.args[0]) if err.args else str(err))
    data_out = {
        "out": str(result.folder),
        "steps": result.steps,
        "images": result.images,
        "seconds": result.seconds,
        "final_loss": result.final_loss,
        "resumed_from_step": result.resumed_from_step,
    }
    _emit(
        fmt,
        data_out,
        f"trained {result.steps} steps ({result.images} images, {result.seconds / 60:.1f} min), "
        f"loss {result.final_loss:.4f} -> {result.folder}",
    )


def _train_masked(out, arch, data, minutes, batch_size, lr, ema_decay, checkpoint_minutes, seed, device, max_steps,
                  fmt) -> None:  # fmt: skip
    """`hasten train --objective mdlm`: the masked diffusion trainer (hasten.discrete.train_masked), same loop."""
    from ..discrete import MaskedTrainConfig, train_masked

    if arch is not Arch.unet:
        _fail(f"--objective mdlm trains a UNet over one-hot tokens; --arch {arch.value} is not available for it")
    try:
        config = MaskedTrainConfig(
            data=data, minutes=minutes, batch_size=batch_size, lr=lr, ema_decay=ema_decay,
            checkpoint_minutes=checkpoint_minutes, seed=seed, **({} if max_steps is None else {"max_steps": max_steps}),
        )  # fmt: skip
        record = train_masked(out, config, progress=fmt is OutputFormat.text, device=device)
    except (FileExistsError, KeyError, ValueError) as err:  # FileExistsError: --force cannot replace a finished one
        _fail(str(err.args[0]) if err.args else str(err))
    data_out = {
        "out": str(out), "steps": record["steps"], "images": record["images_seen"], "seconds": record["seconds"],
        "final_loss": record["final_loss_ema"], "resumed_from_step": record.get("resumed_from"),
    }  # fmt: skip
    minutes_trained = record["seconds"] / 60
    _emit(fmt, data_out, f"trained {record['steps']} steps ({record['images_seen']} images, {minutes_trained:.1f} "
                         f"min), loss {record['final_loss_ema']:.4f} -> {out}")  # fmt: skip


@app.command()
def distill(
    teacher: Annotated[str, typer.Option(help="bundled model name or a model folder to distil")],
    method: Annotated[str, typer.Option(help="progressive, consistency, ctm, reflow, mmd, dmd, guidance, ...")],
    nfe: Annotated[int, typer.Option(help="network calls per image of the student's sampler")],
    out: Annotated[pathlib.Path, typer.Option(help="the student's model folder (must be new unless --resume)")],
    minutes: Annotated[float, typer.Option(help="training time in all, across resumes")] = 30.0,
    batch_size: Annotated[int, typer.Option(help="images per update")] = 64,
    lr: Annotated[float, typer.Option(help="AdamW learning rate")] = 1e-4,
    ema_decay: Annotated[float, typer.Option(help="EMA decay of the exported weights")] = 0.999,
    guidance: Annotated[float, typer.Option(help="the teacher's guidance scale the student learns (1 = none)")] = 1.0,
    cfg_dropout: Annotated[float, typer.Option(help="share of labels replaced by the null class")] = 0.1,
    option: Annotated[
        list[str] | None, typer.Option(help="a method option, key=value (repeatable); see docs/guide/distillation.md")
    ] = None,
    checkpoint_minutes: Annotated[float, typer.Option(help="checkpoint interval")] = 5.0,
    seed: Annotated[int, typer.Option(help="seed")] = 0,
    resume: Annotated[bool, typer.Option(help="continue the run in --out (same settings)")] = False,
    name: Annotated[str | None, typer.Option(help="the student's name [default: the folder's]")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    max_steps: Annotated[int | None, typer.Option(min=1, help="stop after this many updates (smoke tests)")] = None,
    fmt: FormatOption = OutputFormat.text,
) -> None:
    """Train a few-step student of a model; it samples at --nfe network calls with no sampler flags
    (`hasten sample --model OUT`). Rerun with --resume to continue after an interruption."""
    from ..distill import METHODS, DistillConfig
    from ..distill import distill as run_distill
    from ..distill._base import has_run

    device = _check_device(device)
    if method not in METHODS:
        _fail(f"--method {method!r} is not a distillation method; available: {', '.join(METHODS.names())}")
    options: dict[str, Any] = {}
    for item in option or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            _fail(f"--option {item!r} must look like key=value")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    if resume:
        if out.is_dir() and any(out.iterdir()) and not has_run(out):
            _fail(f"--out {out} holds files but no distillation checkpoint to resume; use another folder")
        _check_output_folder(out, "--out", force=True)
    else:
        if out.is_dir() and has_run(out):
            _fail(f"--out {out} holds a distillation run; pass --resume to continue it, or use another folder")
        _check_output_folder(out, "--out", force=False)
    try:
        config = DistillConfig.create(
            teacher=teacher, method=method, nfe=nfe, minutes=minutes, batch_size=batch_size, lr=lr,
            ema_decay=ema_decay, guidance=guidance, cfg_dropout=cfg_dropout, checkpoint_minutes=checkpoint_minutes,
            seed=seed, options=options,
        )  # fmt: skip
        result = run_distill(
            config, out, resume=resume, device=device, max_steps=max_steps, progress=fmt is OutputFormat.text,
            name=name,
        )  # fmt: skip
    except (FileNotFoundError, FileExistsError, KeyError, TypeError, ValueError) as err:
        _fail(str(err.args[0]) if err.args else str(err))
    data_out = {
        "out": str(result.folder),
        "method": method,
        "nfe": nfe,
        "steps": result.steps,
        "seconds": result.seconds,
        "final_loss": result.final_loss,
        "resumed_from_step": result.resumed_from_step,
    }
    _emit(
        fmt,
        data_out,
        f"distilled a {nfe}-NFE {method} student of {teacher}: {result.steps} updates, {result.seconds / 60:.1f} min, "
        f"loss {result.final_loss:.4g} -> {result.folder} (hasten sample --model {result.folder})",
    )


@app.command()
def ensemble(
    members: Annotated[
        list[str], typer.Argument(help="bundled model names or model folders (the first one's schedule)")
    ],
    out: Annotated[
        pathlib.Path, typer.Option(help="the ensemble's model folder (must be new unless --resume/--force)")
    ],
    method: Annotated[str, typer.Option(help="afa (learned feature aggregation) or average (output average)")] = "afa",
    weights: Annotated[
        str | None, typer.Option(help="average: comma-separated weights summing to 1 [default: equal]")
    ] = None,
    blocks: Annotated[
        str | None, typer.Option(help="afa: comma-separated blocks to fuse [default: every block and conv_out]")
    ] = None,
    minutes: Annotated[float | None, typer.Option(help="afa: training time in all, across resumes")] = None,
    batch_size: Annotated[int, typer.Option(help="afa: images per update")] = 32,
    lr: Annotated[float, typer.Option(help="afa: AdamW learning rate")] = 1e-3,
    hidden: Annotated[int, typer.Option(help="afa: width of the attention heads")] = 16,
    cfg_dropout: Annotated[float, typer.Option(help="afa: share of labels replaced by the null class")] = 0.1,
    checkpoint_minutes: Annotated[float, typer.Option(help="afa: checkpoint interval")] = 5.0,
    seed: Annotated[int, typer.Option(help="seed")] = 0,
    resume: Annotated[bool, typer.Option(help="continue the AFA run in --out (same settings)")] = False,
    force: Annotated[bool, typer.Option(help="replace the ensemble in an --out folder that holds files")] = False,
    name: Annotated[str | None, typer.Option(help="the ensemble's name [default: the folder's]")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    max_steps: Annotated[
        int | None, typer.Option(min=1, help="afa: stop after this many updates (smoke tests)")
    ] = None,
    fmt: FormatOption = OutputFormat.text,
) -> None:
    """Combine models into one (`hasten sample --model OUT` runs it): the output average (any architectures), or
    AFA, which trains a small attention that fuses same-architecture UNets' block features. See
    docs/guide/ensembling.md."""
    from ..ensemble import METHODS, EnsembleConfig, build_ensemble

    device = _check_device(device)
    if method not in METHODS:
        _fail(f"--method {method!r} is not an ensemble method; allowed: {', '.join(METHODS)}")
    parsed_weights: tuple[float, ...] = ()
    if weights is not None:
        try:
            parsed_weights = tuple(float(w) for w in weights.split(","))
        except ValueError:
            _fail(f"--weights {weights!r} must be comma-separated numbers, e.g. 0.5,0.5")
    parsed_blocks = tuple(b.strip() for b in blocks.split(",")) if blocks is not None else ()
    if any(not b for b in parsed_blocks):
        _fail(f"--blocks {blocks!r} names an empty block; give module names such as up_blocks.2,conv_out")
    for flag, value in (("--minutes", minutes), ("--checkpoint-minutes", checkpoint_minutes), ("--lr", lr)):
        if value is not None and not 0 < value < float("inf"):
            _fail(f"{flag} must be a finite number > 0, got {value}")
    if out.exists() and not out.is_dir():
        _fail(f"--out {out} is a file; give a folder path")
    for member in members:
        if pathlib.Path(member).exists() and pathlib.Path(member).resolve() == out.resolve():
            _fail(f"--out {out} is member {member!r}; write the ensemble to another folder")
    try:
        config = EnsembleConfig.create(
            members=tuple(members), method=method, weights=parsed_weights, blocks=parsed_blocks, hidden=hidden,
            minutes=minutes, batch_size=batch_size, lr=lr, cfg_dropout=cfg_dropout,
            checkpoint_minutes=checkpoint_minutes, seed=seed,
        )  # fmt: skip
        result = build_ensemble(
            config, out, resume=resume, overwrite=force, device=device, max_steps=max_steps,
            progress=fmt is OutputFormat.text, name=name,
        )  # fmt: skip
    except (FileNotFoundError, FileExistsError, KeyError, TypeError, ValueError) as err:
        _fail(str(err.args[0]) if err.args else str(err))
    data_out = {
        "out": str(result.folder),
        "method": result.method,
        "members": list(members),
        "steps": result.steps,
        "seconds": result.seconds,
        "final_loss": result.final_loss,
        "resumed_from_step": result.resumed_from_step,
    }
    trained = (
        f", {result.steps} updates, {result.seconds / 60:.1f} min, loss {result.final_loss:.4g}"
        if result.method == "afa"
        else ""
    )
    _emit(
        fmt,
        data_out,
        f"{result.method} ensemble of {len(members)} models{trained} -> {result.folder} "
        f"(hasten sample --model {result.folder})",
    )


@app.command()
def prune(
    model: Annotated[str, typer.Option(help="bundled model name or a (float) model folder to prune")],
    out: Annotated[pathlib.Path, typer.Option(help="the pruned model's folder (must be new unless --resume)")],
    target_speedup: Annotated[
        float, typer.Option(help="network-level speed-up to reach, measured on this machine (least pruning that does)")
    ] = 1.5,
    finetune_minutes: Annotated[float, typer.Option(help="fine-tune time in all, across resumes")] = 30.0,
    structure: Annotated[str, typer.Option(help="channels (Torch-Pruning) or blocks (of a transformer)")] = "channels",
    importance: Annotated[
        str, typer.Option(help="auto, taylor or magnitude (channels), output_change (blocks)")
    ] = "auto",
    ratio: Annotated[float | None, typer.Option(help="prune exactly this share of channels (no speed search)")] = None,
    blocks: Annotated[str | None, typer.Option(help="remove exactly these blocks, e.g. 2,4 (no speed search)")] = None,
    steps: Annotated[int, typer.Option(min=1, help="steps of the pruned model's default sampler")] = 10,
    batch_size: Annotated[int, typer.Option(help="images per fine-tune update")] = 64,
    lr: Annotated[float, typer.Option(help="AdamW learning rate of the fine-tune")] = 2e-4,
    ema_decay: Annotated[float, typer.Option(help="EMA decay of the exported weights")] = 0.995,
    timing_batch: Annotated[int, typer.Option(min=1, help="batch the speed-up is measured at")] = 128,
    option: Annotated[
        list[str] | None, typer.Option(help="a pruning option, key=value (repeatable); see docs/guide/pruning.md")
    ] = None,
    seed: Annotated[int, typer.Option(help="seed")] = 0,
    resume: Annotated[bool, typer.Option(help="continue the run in --out (same settings)")] = False,
    name: Annotated[str | None, typer.Option(help="the pruned model's name [default: the folder's]")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    max_steps: Annotated[int | None, typer.Option(min=1, help="stop after this many updates (smoke tests)")] = None,
    fmt: FormatOption = OutputFormat.text,
) -> None:
    """Prune a model's network for a measured speed-up (Torch-Pruning), then fine-tune it by distillation from the
    unpruned model; the folder loads like any model (`hasten sample --model OUT`). Rerun with --resume after an
    interruption."""
    from ..distill._base import has_run
    from ..prune import PruneOptions
    from ..prune import prune as run_prune

    device = _check_device(device)
    options: dict[str, Any] = {}
    for item in option or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            _fail(f"--option {item!r} must look like key=value")
        own_flags = ("structure", "importance", "ratio", "blocks")
        if key not in PruneOptions.__dataclass_fields__ or key in own_flags:
            _fail(
                f"--option {key!r} is not a pruning option; see docs/guide/pruning.md (structure, importance, ratio "
                "and blocks have their own flags)"
            )
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    block_list = None
    if blocks is not None:
        try:
            block_list = tuple(int(b) for b in blocks.split(",") if b.strip())
        except ValueError:
            _fail(f"--blocks {blocks!r} must be block indices separated by commas, e.g. 2,4")
        if structure != "blocks":
            _fail("--blocks removes transformer blocks: it needs --structure blocks")
    if ratio is not None and structure != "channels":
        _fail("--ratio prunes a share of channels: it needs --structure channels")
    if not target_speedup > 1.0:
        _fail(f"--target-speedup must be > 1, got {target_speedup}")
    if resume:
        if out.is_dir() and any(out.iterdir()) and not has_run(out):
            _fail(f"--out {out} holds files but no pruning run to resume; use another folder")
        _check_output_folder(out, "--out", force=True)
    else:
        if out.is_dir() and has_run(out):
            _fail(f"--out {out} holds a pruning run; pass --resume to continue it, or use another folder")
        _check_output_folder(out, "--out", force=False)
    try:
        result = run_prune(
            model, out, target_speedup=target_speedup, finetune_minutes=finetune_minutes, structure=structure,
            importance=importance, ratio=ratio, blocks=block_list, steps=steps, batch_size=batch_size, lr=lr,
            ema_decay=ema_decay, timing_batch=timing_batch, seed=seed, resume=resume, device=device,
            max_steps=max_steps, progress=fmt is OutputFormat.text, name=name, **options,
        )  # fmt: skip
    except (FileNotFoundError, FileExistsError, KeyError, TypeError, ValueError) as err:
        _fail(str(err.args[0]) if err.args else str(err))
    record = json.loads((result.folder / "hasten.json").read_text())["pruning"]
    chosen = result.selection["chosen"]
    data_out = {
        "out": str(result.folder),
        "structure": structure,
        "chosen": chosen,
        "macs_before": record["macs_before"],
        "macs_after": record["macs_after"],
        "parameters_before": record["parameters_before"],
        "parameters_after": record["parameters_after"],
        "steps": result.steps,
        "seconds": result.seconds,
        "final_loss": result.final_loss,
    }
    speed = f", measured {chosen['speedup']:.2f}x network speed-up" if "speedup" in chosen else ""
    _emit(
        fmt,
        data_out,
        f"pruned {model} ({structure}{speed}; MACs {record['macs_before'] / 1e6:.1f}M -> "
        f"{record['macs_after'] / 1e6:.1f}M, parameters {record['parameters_before']:,} -> "
        f"{record['parameters_after']:,}), fine-tuned {result.steps} updates in {result.seconds / 60:.1f} min -> "
        f"{result.folder} (hasten sample --model {result.folder})",
    )


@app.command()
def optimize(
    model: ModelOption = "mnist-dit",
    max_quality_loss: Annotated[
        float, typer.Option(help="largest FD change from the converged sampler's (100-step reference), either way")
    ] = 0.05,
    max_rmse: Annotated[
        float | None, typer.Option(help="also (or, without a feature network: only) bound the RMSE to the reference")
    ] = None,
    minutes: Annotated[float, typer.Option(help="wall-clock budget of the whole search")] = 30.0,
    out: Annotated[pathlib.Path, typer.Option(help="recipe to write (JSON); the work folder is OUT.optimize/")] = (
        pathlib.Path("recipe.json")
    ),
    plan: Annotated[
        list[pathlib.Path] | None,
        typer.Option(help="plan files or folders of plans to try (those for this model's weights; repeatable)"),
    ] = None,
    guidance: Annotated[
        float | None, typer.Option(help="classifier-free guidance scale (default: the model's, 1 = none)")
    ] = None,
    n: Annotated[
        int, typer.Option("--n", "--num-samples", help="images per evaluation (score and confirmation noise)")
    ] = 200,
    solver: Annotated[
        list[str] | None, typer.Option(help="stock solver specs to scan (repeatable; default: every multistep one)")
    ] = None,
    tune_share: Annotated[
        float, typer.Option(help="share of the budget for tuning plans below the fastest passing NFE (0: none)")
    ] = 0.25,
    caches: Annotated[bool, typer.Option(help="calibrate caches on the fastest passing samplers")] = True,
    exit_heads: Annotated[
        pathlib.Path | None,
        typer.Option(help="exit heads of --model (`hasten accelerate train-exits`): early exit joins the caches"),
    ] = None,
    quant: Annotated[
        list[str] | None, typer.Option(help="quantisation modes to try: w8a8, w4a8 (repeatable; default both)")
    ] = None,
    no_quant: Annotated[bool, typer.Option("--no-quant", help="try no quantisation")] = False,
    peers: Annotated[bool, typer.Option(help="diffusers schedulers, cache hooks and torchao in the stock set")] = True,
    student: Annotated[
        list[str] | None,
        typer.Option(help="a distilled student of --model (`hasten distill` folder or bundled name; repeatable)"),
    ] = None,
    bundled_students: Annotated[
        bool, typer.Option(help="also try the bundled MODEL-fast and MODEL-pruned when made from --model's weights")
    ] = True,
    resume: Annotated[bool, typer.Option(help="continue the search of OUT (its evaluations are reused)")] = False,
    force: Annotated[bool, typer.Option(help="search again and replace OUT")] = False,
    fmt: FormatOption = OutputFormat.text,
) -> None:
    """Find the fastest recipe (sampler or tuned plan, distilled student, cache, quantisation) whose quality loss
    against the model's converged sampler stays within the budget, on held-out noise, confirmed on a third seed.
    Students: --student DIR and the bundled MODEL-fast of these weights, judged against this model. Writes the recipe
    (`hasten sample --recipe`, `hasten bench --recipe`) and OUT.optimize/report.html. Exits with status 3 when
    nothing meets the budget (nothing written but the work folder)."""
    from ..models.zoo import load
    from ..optimize import DEFAULT_SOLVERS, OptimizeConfig, OptimizeError, check_output
    from ..optimize import optimize as run_optimize

    try:
        config = OptimizeConfig(
            max_quality_loss=max_quality_loss, max_rmse=max_rmse, minutes=minutes, guidance=guidance, n=n,
            solvers=tuple(solver) if solver else DEFAULT_SOLVERS, plans=tuple(str(p) for p in plan or ()),
            tune_share=tune_share, caches=caches, quant=() if no_quant else tuple(quant or ("w8a8", "w4a8")),
            peers=peers, students=tuple(student or ()), bundled_students=bundled_students,
            exit_heads=None if exit_heads is None else str(exit_heads),
        )  # fmt: skip
        if exit_heads is not None and not exit_heads.is_file():
            _fail(f"--exit-heads {exit_heads} does not exist")
        for path in config.plans:
            if not pathlib.Path(path).exists():
                _fail(f"--plan {path} does not exist")
        check_output(out, resume=resume, force=force)
        loaded = load(model)
    except (FileNotFoundError, OptimizeError, ValueError) as err:
        _fail(str(err))
    progress = _OptimizeProgress(fmt is OutputFormat.text and sys.stderr.isatty(), minutes)
    try:
        result = run_optimize(loaded, config, out, resume=resume, force=force, on_event=progress.event)
    except OptimizeError as err:
        _fail(str(err))
    finally:
        progress.close()
    work = out.with_name(out.name.removesuffix(".json") + ".optimize")
    data = {"out": str(out) if result.recipe is not None else None, "report": str(work / "report.html"),
            **{k: v for k, v in result.to_dict().items() if k != "evaluations"}}  # fmt: skip
    b = result.budget
    spent = f"{b['seconds_used'] / 60:.1f} of {b['minutes']:g} minutes, {len(result.evaluations)} candidates"
    if result.recipe is None:
        closest = result.closest
        near = ""
        if closest is not None:
            near = f"; closest: {closest['label']} (quality loss {_pct(closest['quality_loss'])}, RMSE "
            near += f"{closest['rmse_ref']:.4f})"
        _emit(fmt, data, f"nothing meets the budget ({spent}){near}; nothing written but {work}")
        raise typer.Exit(3)
    c = result.chosen
    stock = result.best_stock
    versus = "" if stock is None else (
        f"; the fastest stock configuration within the budget ({stock['label']}) runs at {stock['speedup']:.2f}x, so "
        f"{c['speedup'] / stock['speedup']:.2f}x iso-quality"
    )  # fmt: skip
    lines = [f"{loaded.info.name}: {c['label']}: {c['speedup']:.2f}x the baseline ({result.baseline['label']})"
             f"{versus}; quality loss {_pct(c['quality_loss'])}, confirmed {_pct(c['confirmation']['quality_loss'])} "
             f"on seed {c['confirmation']['seed']} ({spent}) -> {out}"]  # fmt: skip
    lines += [f"  {row['step']}: {row['label']}: {row['speedup']:.2f}x, quality loss {_pct(row['quality_loss'])}"
              for row in result.path]  # fmt: skip
    lines += _not_kept(result)
    lines.append(f"  report: {work / 'report.html'}")
    _emit(fmt, data, "\n".join(lines))


def _not_kept(result: Any) -> list[str]:
    """Lines for the timed candidates faster than the chosen one that failed confirmation (the baseline too), so a
    chosen recipe slower than the baseline explains itself."""
    chosen = result.chosen["speedup"]
    return [
        f"  not kept: {r['label']}: {r['speedup']:.2f}x, failed confirmation "
        f"({_pct(r['confirmation']['quality_loss'])} on seed {r['confirmation']['seed']})"
        for r in sorted(result.evaluations, key=lambda r: -r.get("speedup", 0.0))
        if r.get("speedup", 0.0) > chosen and (r.get("confirmation") or {}).get("passed") is False
    ]


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.1%}"


class _OptimizeProgress:
    """The search's progress: a bar over the time budget and the last candidate."""

    def __init__(self, enabled: bool, minutes: float) -> None:
        import time

        from ..progress import BudgetProgress

        self.start = time.perf_counter()
        self.bar = BudgetProgress(enabled, "optimize", 60.0 * minutes)

    def event(self, kind: str, row: dict[str, Any]) -> None:
        import time

        passed = " (passes)" if row.get("passed") else ""
        self.bar.update(time.perf_counter() - self.start, f"{kind}: {row['label'][:60]}{passed}")

    def close(self) -> None:
        self.bar.close()


def main() -> None:
    """The ``hasten`` command; under ``torchrun`` (``WORLD_SIZE`` > 1) every rank joins the process group first,
    and a rank's error is recorded for ``torchrun``'s failure summary (hasten.distributed)."""
    if not _under_torchrun():
        app()
        return
    from torch.distributed.elastic.multiprocessing.errors import record

    from .. import distributed

    distributed.init_from_env()
    finished = False
    try:
        record(app)()
    except SystemExit as end:  # typer ends every command with SystemExit: 0 when it succeeded
        finished = end.code in (0, None)
        raise
    finally:
        distributed.destroy(wait=finished)


if __name__ == "__main__":
    main()
