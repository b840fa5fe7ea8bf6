"""The `moectl` command line. Each command parses its options, loads the config and calls one
library function; user errors become one red line and a non-zero exit (tracebacks with --debug).
Heavy imports (torch, datasets) happen inside the commands so `moectl --help` stays fast.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer

from moectl import __version__
from moectl.common import console, runtime
from moectl.common.errors import ConfigError, MoectlError, PeerFailed

app = typer.Typer(
    name="moectl",
    help="Train, measure, explain and export Mixture-of-Experts language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Options shared by commands.
def _check_overrides(values: Optional[list[str]]) -> Optional[list[str]]:
    """`--set KEY VALUE`, a space for the `=`, leaves VALUE an extra argument, which click refuses
    with its usage box before the command runs: say first, in one line, what --set takes."""
    with user_errors(debug=False):
        for item in values or []:
            if "=" not in item:
                from moectl import config

                config.parse_override(item)  # the one message for an override without `=`
    return values


SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", metavar="KEY=VALUE", callback=_check_overrides,
                 help="Override a config key, e.g. --set moe.top_k=1 (repeatable)."),
]
DebugOption = Annotated[bool, typer.Option("--debug", help="Show the full traceback of any error.")]


# Flags that take one of a fixed set of values: --help lists them (the metavar), and the command
# refuses any other in the one-line house style (`_choose`), not click's usage box. Written out
# here rather than imported, so `moectl --help` does not import torch; a test keeps them equal to
# the library's own lists (export.FORMATS, export.DTYPES).
SPLITS = ("validation", "train")
EXPORT_FORMATS = ("safetensors", "hf")
EXPORT_DTYPES = ("fp32", "bf16", "fp16")
PRUNE_CRITERIA = ("frequency", "reap", "naee", "random")
QUANT_EXPERTS = ("int8", "int4")
QUANT_REST = ("bf16", "int8", "none")


def _choices(values: tuple[str, ...]) -> str:
    return "[" + "|".join(values) + "]"


def _choose(flag: str, value: str, values: tuple[str, ...]) -> str:
    if value not in values:
        raise ConfigError(f"{flag} {value!r}: choose {', '.join(values[:-1])} or {values[-1]}")
    return value


def _version() -> str:
    """The installed package's version (its metadata), else this source tree's."""
    try:
        return version("moectl")
    except PackageNotFoundError:
        return __version__


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"moectl {_version()}")
        raise typer.Exit()


@app.callback()  # the options of `moectl` itself, before any command
def _main(
    show_version: Annotated[
        bool,
        typer.Option("--version", callback=_show_version, is_eager=True, help="Print moectl's version and exit."),
    ] = False,
) -> None:
    pass


def _report(message: str, exc: BaseException) -> None:
    """Print an error once per job: in a multi-process run every rank meets the same config
    error and rank 0 alone says it; any other error names the rank it happened on."""
    env = runtime.torchrun_env()
    if env.enabled:
        if isinstance(exc, ConfigError):
            if not env.is_main:
                return
        else:
            message = f"rank {env.rank}: {message}"
    console.error(message)


@contextmanager
def user_errors(debug: bool) -> Iterator[None]:
    """The one place that turns errors into a clean message and an exit code."""
    try:
        yield
    except PeerFailed:
        raise typer.Exit(1) from None  # the failing rank has printed its own error
    except MoectlError as exc:
        if debug:
            raise
        _report(str(exc), exc)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        console.error("interrupted")
        raise typer.Exit(130) from None
    except (typer.Exit, typer.Abort):
        raise
    except Exception as exc:
        if debug:
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        _report(f"unexpected {exc.__class__.__name__}: {first} (rerun with --debug for the traceback)", exc)
        raise typer.Exit(1) from None


def _load_config(path: Path, overrides: Optional[list[str]], run_name: Optional[str] = None):
    """A config file, or a run directory (its resolved config.yaml, with run.dir/name pointing at it)."""
    from moectl import config

    if path.is_dir():
        if not (path / "config.yaml").is_file():
            raise MoectlError(f"{path} is a directory without config.yaml; give a config file or a run directory")
        cfg = config.load(path / "config.yaml", overrides, saved=True)
        run_dir = path.resolve()
        cfg = config.with_values(cfg, str(path), **{"run.dir": str(run_dir.parent), "run.name": run_dir.name})
    else:
        cfg = config.load(path, overrides)
    if cfg.router_filled:  # --set moe.router=R on a config written for another router
        values = ", ".join(f"{k}={getattr(cfg.moe, k.split('.', 1)[1])}" for k in cfg.router_filled)
        console.status(f"moe.router={cfg.moe.router} brings {values} (what it needs and its paper's defaults; "
                       "--set any of them to choose your own)")
    if run_name is not None:
        cfg = config.with_values(cfg, "--run-name", **{"run.name": run_name})
    return cfg


@app.command()
def train(
    config_path: Annotated[
        Path, typer.Argument(metavar="CONFIG", help="YAML config file, or a run directory to --resume.", show_default=False)
    ],
    overrides: SetOption = None,
    run_name: Annotated[Optional[str], typer.Option("--run-name", help="Run name: outputs go to runs/NAME.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run from its latest checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Delete an existing run of this name first.")] = False,
    nproc_per_node: Annotated[
        Optional[int],
        typer.Option(
            "--nproc-per-node",
            min=1,
            help="Train with N processes on this machine (DDP), started by torchrun's launcher: one per GPU, "
            "or gloo processes on CPU.",
        ),
    ] = None,
    debug: DebugOption = False,
) -> None:
    """Train an LSTM-MoE or Transformer-MoE language model from one YAML config."""
    with user_errors(debug):
        cfg = _load_config(config_path, overrides, run_name)  # a bad config stops here, before any process starts
        if resume and not overwrite:
            from moectl.services import checkpoint

            # A finished run is a no-op (exit 0), not an error: a job script that reruns one
            # `--resume` command after preemption must also succeed once the run is done.
            done = checkpoint.finished(cfg)
            if done:
                console.warn(done)
                return
        if nproc_per_node is not None:
            if runtime.under_torchrun():
                raise ConfigError("--nproc-per-node starts torchrun itself; under torchrun, drop it")
            from moectl.services.distributed import launch
            from moectl.services.expert_parallel import check_layout

            check_layout(cfg.train.expert_parallel, nproc_per_node)

            args = ["train", str(config_path), *(a for o in overrides or [] for a in ("--set", o))]
            args += ["--run-name", run_name] if run_name else []
            args += [flag for flag, on in (("--resume", resume), ("--overwrite", overwrite), ("--debug", debug)) if on]
            code = launch(nproc_per_node, args)
            if code:
                raise typer.Exit(code)
            return
        console.quiet_libraries()
        from moectl.commands.train import fit

        result = fit(cfg, resume=resume, overwrite=overwrite)
        console.train_summary(result, instruction_tuned=cfg.data.task == "sft")
        if result.interrupted:
            raise typer.Exit(130)


RunArgument = Annotated[
    Path,
    typer.Argument(metavar="RUN", help="A run directory (its latest checkpoint) or a checkpoint directory.", show_default=False),
]
SplitOption = Annotated[str, typer.Option("--split", metavar=_choices(SPLITS), help="Split to use.")]
MaxBatchesOption = Annotated[
    Optional[int],
    typer.Option("--max-batches", min=1, help="Batches to use, spread over the split. Default: train.eval_batches."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON (documented keys) instead of the report.")]
OffloadOption = Annotated[
    bool, typer.Option("--offload-experts", help="Keep the routed experts in the checkpoint file and at most "
                       "--expert-cache of each MoE layer's in memory; report the cache's hit rates.")
]
CacheOption = Annotated[
    Optional[int], typer.Option("--expert-cache", metavar="K", help="Experts resident per MoE layer with "
                                "--offload-experts. Default: half of them (at least top_k).")
]
PolicyOption = Annotated[str, typer.Option("--cache-policy", metavar="[lru|lfu|lfru]", help="Which resident expert a "
                                           "miss evicts: least recently, least often, or least often recently used.")]
PrefetchOption = Annotated[bool, typer.Option("--prefetch", help="With --offload-experts: run the next MoE layer's "
                                              "router on this layer's input and read in what it picks.")]


def _offload(enabled: bool, capacity: Optional[int], policy: str, prefetch: bool, run: Path):
    """The Offload the flags ask for (None without --offload-experts); its K defaults to E/2."""
    if not enabled:
        if capacity is not None or prefetch or policy != "lru":
            raise ConfigError("--expert-cache, --cache-policy and --prefetch need --offload-experts")
        return None
    from moectl import config
    from moectl.services import checkpoint
    from moectl.services.offload import Offload

    if capacity is None:
        _, run_dir = checkpoint.resolve(run)
        moe = config.load(run_dir / "config.yaml", saved=True).moe
        capacity = max(-(-moe.num_experts // 2), moe.top_k)
    return Offload(capacity, policy, prefetch)


SkipOption = Annotated[
    Optional[float],
    typer.Option("--skip-threshold", metavar="BETA", help="Dynamic expert skipping (NAEE, Lu et al. 2024): leave out a "
                 "token's choices weighted below BETA x its first choice's, and report the expert calls saved."),
]


def _capacity_factor(value: str) -> str:
    """--capacity-factor checked at the flag, so a bad value names the flag, not the config key it sets."""
    if value == "dropless":
        return value
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not (math.isfinite(number) and number > 0):
        raise ConfigError(f"--capacity-factor {value}: must be a number > 0 or dropless")
    return value


@app.command("eval")
def eval_command(
    run: RunArgument,
    split: SplitOption = "validation",
    overrides: SetOption = None,
    max_batches: MaxBatchesOption = None,
    capacity_factor: Annotated[
        Optional[str],
        typer.Option("--capacity-factor", help="Eval capacity factor of the MoE layers: a number > 0, or dropless."),
    ] = None,
    stride: Annotated[
        Optional[int],
        typer.Option("--stride", help="Sliding-window evaluation: score each token once, in a window of seq_len "
                     "tokens moved S at a time, so it sees at least seq_len - S tokens of context.", min=1),
    ] = None,
    stateful: Annotated[
        Optional[bool],
        typer.Option("--stateful/--stateless", help="LSTM: carry the state across consecutive blocks, or start "
                     "each block from zero. Default: as the model trained (train.lstm_stateful)."),
    ] = None,
    skip_threshold: SkipOption = None,
    offload_experts: OffloadOption = False,
    expert_cache: CacheOption = None,
    cache_policy: PolicyOption = "lru",
    prefetch: PrefetchOption = False,
    as_json: JsonOption = False,
    out: Annotated[Optional[Path], typer.Option("--out", help="Also write the JSON to this file.")] = None,
    debug: DebugOption = False,
) -> None:
    """Measure a checkpoint: loss, perplexity, bits per byte, and how each MoE layer routed."""
    with user_errors(debug):
        import json

        from moectl.commands import evaluate
        from moectl.common.fileio import atomic_write_text
        from moectl.services import loaded_model

        _choose("--split", split, SPLITS)
        extra = [] if capacity_factor is None else [f"moe.eval_capacity_factor={_capacity_factor(capacity_factor)}"]
        offload = _offload(offload_experts, expert_cache, cache_policy, prefetch, run)
        model = loaded_model.load(run, (overrides or []) + extra, offload)
        model.skip_weak_experts(skip_threshold)
        console.quiet_libraries()
        result = evaluate.run(model, split, max_batches, stride, stateful)
        report = result.to_dict()
        if offload is not None:
            from moectl.services import offload as offloading

            report["offload"] = offloading.report(model.model, model.slots, offload)
        text = json.dumps(report, indent=2) + "\n"
        if out is not None:
            atomic_write_text(out, text)
        if as_json:
            typer.echo(text, nl=False)
        else:
            evaluate.show(result)
            if offload is not None:
                offloading.show(report["offload"])


@app.command("route-stats")
def route_stats_command(
    run: RunArgument,
    split: SplitOption = "validation",
    overrides: SetOption = None,
    max_batches: MaxBatchesOption = None,
    out: Annotated[
        Optional[Path],
        typer.Option("--out", help="Write stats.json, one CSV per layer, PNG heatmaps and TensorBoard events here."),
    ] = None,
    compare: Annotated[
        Optional[Path], typer.Option("--compare", help="Another checkpoint of the same model: report routing drift "
                                     "(a LoRA run: against its base model unless given).")
    ] = None,
    cache_sim: Annotated[
        Optional[int], typer.Option("--cache-sim", metavar="K", help="Replay the routing, one token at a time, "
                                    "through an expert cache of K per layer: hit rates without loading any weights.")
    ] = None,
    policy: Annotated[str, typer.Option("--policy", "--cache-policy", metavar="[lru|lfu|lfru]",
                                        help="The cache policy of --cache-sim (as --cache-policy of eval).")] = "lru",
    as_json: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Explain a checkpoint's routing: balance per layer, each expert's share and specialisation."""
    with user_errors(debug):
        import json

        from moectl.commands import route_stats
        from moectl.services import loaded_model

        _choose("--split", split, SPLITS)
        model = loaded_model.load(run, overrides)
        compare = compare if compare is not None else model.lora_base  # a LoRA run: drift from its base
        other = loaded_model.load(compare, overrides) if compare is not None else None
        console.quiet_libraries()
        if cache_sim is None and policy != "lru":
            raise ConfigError("--policy picks the cache policy of --cache-sim K; give --cache-sim too")
        rep = route_stats.report(model, split, max_batches, other, None if cache_sim is None else (cache_sim, policy))
        if out is not None:
            route_stats.write_outputs(rep, out)
        if as_json:
            typer.echo(json.dumps(rep, indent=2))
            return
        typer.echo("\n".join(route_stats.render(rep)))
        if out is not None:
            console.status(f"wrote {out}/stats.json, layerNN.csv, load_heatmap.png, coselection_layerNN.png, tensorboard/")


@app.command("plan")
def plan_command(
    run: RunArgument,
    hardware: Annotated[
        str,
        typer.Option("--hardware", help="A preset (gpu-node: 8 GPUs with NVLink; gpu-2nodes: two of them at 400 Gb/s "
                     "per GPU; cpu: gloo processes on this kind of CPU) or a YAML file with flops, intra_bandwidth, "
                     "inter_bandwidth, latency, devices_per_node, memory (and nodes)."),
    ] = "gpu-node",
    overrides: SetOption = None,
    max_batches: MaxBatchesOption = None,
    as_json: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Predict a run's training step on other hardware and layouts (DDP, expert parallelism, shadowing, overlap)."""
    with user_errors(debug):
        import json

        from moectl.commands import plan
        from moectl.services import loaded_model

        hw = plan.read_hardware(hardware)
        model = loaded_model.load(run, overrides)
        if not model.slots:
            raise ConfigError(f"{run} is a dense model: there are no experts to lay out; plan an MoE run")
        console.quiet_libraries()
        rep = plan.report(model.cfg, hw, plan.dense_parameters(model.model), plan.routing_loads(model, max_batches))
        if as_json:
            typer.echo(json.dumps(rep, indent=2))
            return
        typer.echo("\n".join(plan.render(rep)))


@app.command()
def generate(
    run: RunArgument,
    prompt: Annotated[str, typer.Option("--prompt", help="Text to continue (empty: start a new document).")] = "",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Tokens to generate at most.")] = 100,
    temperature: Annotated[float, typer.Option("--temperature", help="Sampling temperature; 0 is greedy.")] = 0.8,
    top_k: Annotated[Optional[int], typer.Option("--top-k", help="Sample from the k most likely tokens only.")] = None,
    top_p: Annotated[Optional[float], typer.Option("--top-p", help="Sample from the smallest set of mass p.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed: the same seed gives the same text.")] = 0,
    show_routing: Annotated[
        Optional[int],
        typer.Option("--show-routing", metavar="LAYER", help="Colour each new token by its top-1 expert in this MoE layer."),
    ] = None,
    chat_turn: Annotated[
        Optional[bool],
        typer.Option("--chat/--raw", help="Send the prompt as a user turn in the run's chat template and generate the "
                     "answer, or continue the raw text. Default: --chat for instruction-tuned runs (data.task=sft)."),
    ] = None,
    skip_threshold: SkipOption = None,
    offload_experts: OffloadOption = False,
    expert_cache: CacheOption = None,
    cache_policy: PolicyOption = "lru",
    prefetch: PrefetchOption = False,
    debug: DebugOption = False,
) -> None:
    """Sample text from a checkpoint, optionally showing which expert each new token went to."""
    with user_errors(debug):
        from moectl.commands import generate as generation
        from moectl.services import loaded_model

        offload = _offload(offload_experts, expert_cache, cache_policy, prefetch, run)
        model = loaded_model.load(run, offload=offload)
        model.skip_weak_experts(skip_threshold)
        result = generation.generate(model, prompt, max_new_tokens, temperature, top_k, top_p, seed, show_routing,
                                     chat_turn)
        generation.show(result, model, show_routing)
        if offload is not None:
            from moectl.services import offload as offloading

            offloading.show(offloading.report(model.model, model.slots, offload))


@app.command()
def export(
    run: RunArgument,
    out: Annotated[Path, typer.Option("--out", help="Directory to write the bundle to.", show_default=False)],
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            metavar=_choices(EXPORT_FORMATS),
            help="safetensors: a self-contained bundle moectl's commands read; hf: a Mixtral directory that "
            "transformers loads with AutoModelForCausalLM.from_pretrained.",
        ),
    ] = "safetensors",
    dtype: Annotated[str, typer.Option("--dtype", metavar=_choices(EXPORT_DTYPES), help="Weight precision.")] = "fp32",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing bundle at --out.")] = False,
    merge_lora: Annotated[bool, typer.Option("--merge-lora", help="A LoRA run: fold the adapters into the weights "
                                             "(without it the export keeps the base and the adapters apart).")] = False,
    debug: DebugOption = False,
) -> None:
    """Ship a checkpoint: weights, config, tokenizer and a model card in one directory."""
    with user_errors(debug):
        from moectl.commands import export as exporting
        from moectl.services import checkpoint, hf, loaded_model

        fmt, dtype = _choose("--format", fmt, EXPORT_FORMATS), _choose("--dtype", dtype, EXPORT_DTYPES)
        model = loaded_model.load(run)
        if merge_lora:
            exporting.merge_lora(model)
        console.quiet_libraries()
        if fmt == "hf":
            path = exporting.export_hf(model, out, dtype, overwrite)
            arch = hf.NAMES[hf.architecture(model.cfg.moe)]
            console.status(f"wrote {path}: a {arch} model ({dtype}) whose logits were checked against moectl's")
            typer.echo(f'AutoModelForCausalLM.from_pretrained("{path}"); AutoTokenizer.from_pretrained("{path}")')
            return
        path = exporting.export_bundle(model, out, dtype, overwrite)
        adapter = f", {checkpoint.ADAPTER} (LoRA)" if model.adapters else ""
        console.status(f"wrote {path}: model.safetensors ({dtype}){adapter}, config.yaml, tokenizer.json, meta.json, README.md")
        typer.echo(f"moectl eval {path}\nmoectl route-stats {path}\nmoectl generate {path} --prompt \"...\"")


@app.command()
def prune(
    run: RunArgument,
    out: Annotated[Path, typer.Option("--out", help="Directory to write the pruned bundle to.", show_default=False)],
    keep: Annotated[Optional[int], typer.Option("--keep", min=1, help="Experts to keep in every MoE layer.")] = None,
    ratio: Annotated[
        Optional[float], typer.Option("--ratio", help="Fraction of each MoE layer's experts to remove (instead of --keep).")
    ] = None,
    criterion: Annotated[
        str,
        typer.Option("--criterion", metavar=_choices(PRUNE_CRITERIA), help="frequency: routed share; reap: gate x "
                     "expert output norm (Lasby et al. 2025); naee: the subset that best reconstructs each layer's "
                     "output (Lu et al. 2024, tries every subset); random: the baseline."),
    ] = "reap",
    calib_batches: Annotated[
        Optional[int], typer.Option("--calib-batches", min=1, help="Calibration batches. Default: train.eval_batches.")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of --criterion random.")] = 0,
    overrides: SetOption = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing bundle at --out.")] = False,
    as_json: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Remove experts from every MoE layer, chosen on calibration data (--set data.* for other data)."""
    with user_errors(debug):
        import json

        from moectl.commands import prune as pruning
        from moectl.services import loaded_model

        criterion = _choose("--criterion", criterion, PRUNE_CRITERIA)
        model = loaded_model.load(run, overrides)
        console.quiet_libraries()
        path, result, losses = pruning.prune(model, out, criterion, keep, ratio, calib_batches, seed, overwrite)
        if as_json:
            typer.echo(json.dumps({"out": str(path), **result.card(), **losses, "seconds": result.seconds,
                                   "scores": result.scores, "naee_error": result.naee_error}, indent=2))
            return
        for slot, ids in zip(model.slots, result.keep):
            typer.echo(f"layer {slot:02d}: keeps experts {ids}")
        console.status(f"wrote {path}: {result.kept} of {result.of} experts per MoE layer ({criterion}); eval loss "
                       f"{losses['eval_loss_before']:.4f} -> {losses['eval_loss_after']:.4f}")
        typer.echo(f"moectl eval {path}\nmoectl route-stats {path}\nmoectl generate {path} --prompt \"...\"")


@app.command()
def quantize(
    run: RunArgument,
    out: Annotated[Path, typer.Option("--out", help="Directory to write the quantised bundle to.", show_default=False)],
    experts: Annotated[
        str, typer.Option("--experts", metavar=_choices(QUANT_EXPERTS), help="Precision of the routed experts.")
    ] = "int4",
    rest: Annotated[
        str,
        typer.Option("--rest", metavar=_choices(QUANT_REST), help="Precision of attention, shared experts, dense FFNs, "
                     "LSTM, embeddings and head (none: fp32). The router is never below bf16."),
    ] = "bf16",
    group_size: Annotated[int, typer.Option("--group-size", help="Values per scale, along each row.")] = 64,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing bundle at --out.")] = False,
    as_json: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Store a model's weights in fewer bits by role (experts int8 or int4), dequantised on load."""
    with user_errors(debug):
        import json

        from moectl.commands import quantize as quantizing
        from moectl.services import loaded_model

        experts, rest = _choose("--experts", experts, QUANT_EXPERTS), _choose("--rest", rest, QUANT_REST)
        model = loaded_model.load(run)
        console.quiet_libraries()
        path, rep = quantizing.quantize(model, out, experts, rest, group_size, overwrite)
        if as_json:
            typer.echo(json.dumps(rep, indent=2))
            return
        for role, b in rep["bytes_by_role"].items():
            typer.echo(f"{role:8s} {b['before']:>12,} -> {b['after']:>12,} bytes")
        console.status(f"wrote {path}: {rep['summary']}; model.safetensors {rep['file_bytes']:,} bytes; eval loss "
                       f"{rep['eval_loss_before']:.4f} -> {rep['eval_loss_after']:.4f}")


@app.command()
def sweep(
    sweep_path: Annotated[Path, typer.Argument(metavar="SWEEP", help="Sweep file: base config, grid, variants.", show_default=False)],
    overrides: SetOption = None,
    jobs: Annotated[int, typer.Option("--jobs", min=1, help="Cells trained at a time, each with its share of the cores.")] = 1,
    report: Annotated[bool, typer.Option("--report", help="Only report the cells finished so far; train nothing.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate the sweep and list each cell and the keys it "
                                          "sets; train and write nothing.")] = False,
    debug: DebugOption = False,
) -> None:
    """Train a grid of configurations over seeds and compare them: mean and 95% CI per group."""
    with user_errors(debug):
        from moectl.commands import sweep as sweeping

        console.quiet_libraries()
        code = sweeping.sweep_command(sweep_path, overrides, jobs, report, dry_run)
        if code:
            raise typer.Exit(code)


@app.command("config")
def show_config(
    config_path: Annotated[
        Optional[Path], typer.Argument(metavar="[CONFIG]", help="Config to resolve; omit to list every key.")
    ] = None,
    overrides: SetOption = None,
    debug: DebugOption = False,
) -> None:
    """Print a config resolved and validated (defaults < YAML < --set), or every key's default and meaning."""
    with user_errors(debug):
        from moectl import config

        if config_path is None and not overrides:
            typer.echo(config.reference_yaml(), nl=False)
            return
        cfg = _load_config(config_path, overrides) if config_path else config.load(None, overrides)
        typer.echo(config.dump(cfg), nl=False)


def main() -> None:
    app()
