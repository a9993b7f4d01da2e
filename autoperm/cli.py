"""The ``autoperm`` command: inspect a model's symmetries, align checkpoints, measure barriers, run the zoo.

::

    autoperm inspect resnet18                         # groups and pinned axes, as a table
    autoperm inspect resnet18 --json -o spec.json     # the spec (docs/spec-format.md)
    autoperm align --model resnet18 a.pt b.pt -o b_aligned.safetensors
    autoperm align --model resnet18 a.pt b.pt -o out.pt --method activation --data random
    autoperm barrier --model mymodels:mlp a.pt b.pt --data digits --plot curve.png
    autoperm zoo ...                                  # the coverage run (autoperm.zoo)

MODEL is a timm name or ``package.module:factory`` (see :mod:`autoperm.models`), or a local
transformers folder (config.json + weights: read tensor by tensor, see :mod:`autoperm.folder`);
the full reference is docs/cli.md. Exit status: 0 on success, 1 when a check fails (the aligned
model computes something else), 2 on bad arguments, models, checkpoints or data. Errors are one
line; ``AUTOPERM_DEBUG=1`` shows the traceback.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from ._load import load_state_

__all__ = ["main", "build_parser"]

EXIT_CHECK_FAILED, EXIT_USAGE = 1, 2
VERIFY_TOL = 1e-4  # relative output difference allowed between B and aligned B (float32 round-off is ~1e-6)


class CLIError(Exception):
    """An error to report as ``autoperm: error: ...`` with exit status 2."""


# -- parser ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="autoperm", description="Find the permutation symmetries of a PyTorch model; "
                                "align and compare checkpoints.")
    p.add_argument("--version", action="version", version=f"autoperm {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    model_opts = argparse.ArgumentParser(add_help=False)
    g = model_opts.add_argument_group("model")
    g.add_argument("--input-shape", action="append", metavar="SHAPE", type=_shape,
                   help="one example's input shape without the batch axis, e.g. 3,224,224 (repeat for several "
                        "inputs); default: the timm config, or the factory's own example inputs")
    g.add_argument("--model-arg", action="append", metavar="NAME=VALUE", default=[],
                   help="keyword argument for timm.create_model or the factory, e.g. num_classes=10 (repeatable)")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress messages on stderr")

    data_opts = argparse.ArgumentParser(add_help=False)
    d = data_opts.add_argument_group("data")
    d.add_argument("--data", metavar="DATA",
                   help="'random' (standard-normal inputs of the example shape), 'digits' or 'mnist5k' "
                        "(small real sets shipped in packages), or a .pt/.safetensors/.npz file with tensors x "
                        "(inputs) and y (labels)")
    d.add_argument("--batch-size", type=int, default=64, help="data batch size (default 64)")
    d.add_argument("--num-batches", type=int, default=8, help="batches used for matching (default 8)")
    d.add_argument("--seed", type=int, default=0, help="seed for random data and the matchers (default 0)")
    d.add_argument("--restarts", type=int, default=1,
                   help="weight matching: try this many visiting orders, keep the best (default 1)")
    d.add_argument("--max-iter", type=int, default=100, help="weight matching: at most this many sweeps (default 100)")
    d.add_argument("--steps", type=int, default=100, help="ste: optimisation steps, one batch each (default 100)")
    d.add_argument("--lr", type=float, default=1e-3, help="ste: Adam learning rate (default 1e-3)")

    ins = sub.add_parser("inspect", parents=[model_opts], help="list a model's permutation groups and pinned axes",
                         description="Infer the permutation spec of MODEL and print its groups and pinned axes.")
    ins.add_argument("model", metavar="MODEL",
                     help="timm model name, package.module:factory, or a transformers model folder")
    ins.add_argument("--json", action="store_true", help="print the spec as JSON (docs/spec-format.md)")
    ins.add_argument("-o", "--output", metavar="FILE", help="write the output to FILE instead of stdout")
    ins.add_argument("-v", "--verbose", action="store_true", help="list every member axis of every group")
    ins.add_argument("--check", action="store_true",
                     help="also run the invariance check (permute every group at random, compare outputs)")
    ins.set_defaults(func=cmd_inspect)

    al = sub.add_parser("align", parents=[model_opts, data_opts], help="write checkpoint B aligned to checkpoint A",
                        description="Find the permutation that aligns B to A and write the permuted B. "
                                    "The output computes the same function as B.")
    _pair_args(al)
    al.add_argument("-o", "--output", metavar="OUT", required=True,
                    help="aligned B: .safetensors, or a torch file (.pt, .pth, .bin); never one of the inputs")
    al.add_argument("--method", choices=("weight", "activation", "ste"), default="weight",
                    help="matcher (default weight; activation and ste need --data)")
    al.add_argument("--perm-out", metavar="FILE", help="also write the permutation as JSON")
    al.add_argument("--spec-out", metavar="FILE", help="also write the spec as JSON")
    al.add_argument("--no-verify", action="store_true", help="skip checking that aligned B computes what B computes")
    al.set_defaults(func=cmd_align)

    ba = sub.add_parser("barrier", parents=[model_opts, data_opts],
                        help="loss/error along the straight line from A to B, naive and aligned",
                        description="Evaluate the models (1-λ)·A + λ·B, with B as is (naive) and aligned to A, on "
                                    "labelled data; print the barriers and optionally plot the curves.")
    _pair_args(ba)
    ba.add_argument("--method", choices=("weight", "activation", "ste"), default="weight",
                    help="matcher (default weight)")
    ba.add_argument("--points", type=int, default=11, help="number of λ values from 0 to 1 (default 11)")
    ba.add_argument("--plot", metavar="PNG", help="write the curves as a PNG")
    ba.add_argument("--json", metavar="FILE", dest="json_out", help="write the curves and barriers as JSON")
    ba.add_argument("--no-reset-bn", action="store_true",
                    help="do not recompute BatchNorm statistics of interpolated models on the data")
    ba.add_argument("--max-examples", type=int, default=2000, help="evaluate on at most this many examples")
    ba.set_defaults(func=cmd_barrier)

    mk = sub.add_parser("mergekit", help="align the models of a mergekit config before merging (a pre-pass)",
                        description="Align every model a mergekit YAML config names to its base_model (else its "
                                    "first model); write the aligned folders and a config naming them.")
    from .plugins.mergekit import build_parser as _mergekit_args

    _mergekit_args(mk)
    mk.set_defaults(func=cmd_mergekit)

    zo = sub.add_parser("zoo", add_help=False, help="run the model-zoo coverage report (arguments go to autoperm.zoo)")
    zo.add_argument("args", nargs=argparse.REMAINDER)
    zo.set_defaults(func=cmd_zoo)
    return p


def _pair_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="MODEL", help="timm model name or package.module:factory (not needed when "
                   "A and B are transformers model folders)")
    p.add_argument("a", metavar="A", help="reference checkpoint (.safetensors, .pt, .pth, .bin, .ckpt) or "
                                          "transformers model folder")
    p.add_argument("b", metavar="B", help="checkpoint to align to A")


def _shape(text: str):
    from .models import ModelError, parse_shape

    try:
        return parse_shape(text)
    except ModelError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _version() -> str:
    from . import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (the console script exits with it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv[:1] == ["zoo"]:  # everything after "zoo" belongs to the zoo harness, options included
        args = argparse.Namespace(command="zoo", args=argv[1:], func=cmd_zoo)
    else:
        args = parser.parse_args(argv)
    from .io import CheckpointError
    from .models import ModelError
    from ._trace import TraceError

    from .folder.align import AlignmentCheckError

    try:
        return args.func(args) or 0
    except BrokenPipeError:  # `autoperm inspect ... | head`
        return 0
    except AlignmentCheckError as e:
        _error(args, e)
        return EXIT_CHECK_FAILED
    except (CLIError, CheckpointError, ModelError, TraceError) as e:
        _error(args, e)
        return EXIT_USAGE
    except (ValueError, KeyError, TypeError, RuntimeError, OSError, ImportError, MemoryError) as e:
        _error(args, e, kind=True)  # not one of autoperm's own messages: say what kind of error it is
        return EXIT_USAGE


def _error(args, e: BaseException, kind: bool = False) -> None:
    """Print ``e`` as one line (its first line; the type too if ``kind``); the traceback with AUTOPERM_DEBUG=1."""
    if os.environ.get("AUTOPERM_DEBUG"):
        raise e
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()] or [type(e).__name__]
    more = " ..." if len(lines) > 1 else ""
    prefix = f"{type(e).__name__}: " if kind else ""
    print(f"autoperm {args.command}: error: {prefix}{lines[0]}{more} (AUTOPERM_DEBUG=1 shows the traceback)"
          if kind else f"autoperm {args.command}: error: {lines[0]}{more}", file=sys.stderr)


# -- shared steps ---------------------------------------------------------------------------------
def _log(args, msg: str) -> None:
    if not getattr(args, "quiet", False):
        print(msg, file=sys.stderr, flush=True)


def _resolve(args):
    from .models import parse_model_args, resolve_model

    if not args.model:
        raise CLIError("--model is required unless A and B are transformers model folders")
    t = time.perf_counter()
    rm = resolve_model(args.model, input_shape=args.input_shape, model_args=parse_model_args(args.model_arg))
    shapes = ", ".join("x".join(map(str, s)) for s in rm.input_shapes)
    _log(args, f"model {rm.name} ({rm.source}), example input {shapes}, built in {time.perf_counter() - t:.1f} s")
    return rm


def _infer(args, rm):
    from . import infer_spec

    t = time.perf_counter()
    spec = infer_spec(rm.module, rm.example_inputs)
    _log(args, f"spec: {len(spec.group_sizes)} groups, {spec.num_units} units, "
               f"inferred in {time.perf_counter() - t:.1f} s")
    return spec


def _load_pair(args, rm):
    from .io import load_checkpoint

    ref = rm.module.state_dict()
    a = load_checkpoint(args.a, reference=ref)
    b = load_checkpoint(args.b, reference=ref)
    return a, b


@dataclass
class _Data:
    """Input batches (for matching and BN reset), their labels if any, and labelled evaluation splits."""

    inputs: list
    labels: list | None
    splits: dict | None


def _load_data(args, rm, need_labels: bool) -> _Data:
    from .models import random_like

    spec = args.data
    if spec is None:
        raise CLIError("this needs data: pass --data random, digits, mnist5k or a file with x and y")
    example = rm.example_inputs
    if spec == "random":
        if need_labels:
            raise CLIError("barriers need labelled data: pass --data digits, mnist5k or a file with x and y")
        inputs = [random_like(example, args.batch_size, args.seed + i) for i in range(args.num_batches)]
        return _Data(inputs, None, None)
    if len(example) != 1:
        raise CLIError(f"the model takes {len(example)} inputs; data sets and files give one (x); use --data random "
                       "or a factory with one input")
    if spec in ("digits", "mnist5k"):
        from . import data as datasets

        try:
            ds = getattr(datasets, spec)(seed=args.seed)
        except ImportError as e:
            raise CLIError(f"--data {spec} needs the data extra (pip install 'autoperm[data]'): {e}") from e
        splits = {"train": (ds.x_train, ds.y_train), "test": (ds.x_test, ds.y_test)}
    else:
        splits = {"": _read_xy(spec)}
    shape = tuple(example[0].shape[1:])
    splits = {k: (_fit_shape(x, shape, spec), y) for k, (x, y) in splits.items()}
    if need_labels and any(y is None for _, y in splits.values()):
        raise CLIError(f"{spec} has no labels (y); barriers need labelled data")
    x, y = splits.get("train", splits.get(""))
    n, bs = min(len(x), args.batch_size * args.num_batches), args.batch_size
    inputs = [x[i:i + bs] for i in range(0, n, bs)]
    labels = [y[i:i + bs] for i in range(0, n, bs)] if y is not None else None
    limit = getattr(args, "max_examples", None)
    evals = {k: (x[:limit], y[:limit]) for k, (x, y) in splits.items() if y is not None}
    return _Data(inputs, labels, evals or None)


def _read_xy(path: str):
    if not os.path.isfile(path):
        raise CLIError(f"--data {path}: not 'random', 'digits', 'mnist5k' or an existing file")
    if path.endswith(".npz"):
        import numpy as np

        with np.load(path) as f:
            d = {k: torch.from_numpy(f[k]) for k in f.files}
    else:
        from .io import read_state_dict

        d = read_state_dict(path)
    if "x" not in d:
        raise CLIError(f"--data {path}: no tensor named x (found: {', '.join(sorted(d)) or 'nothing'})")
    x = torch.as_tensor(d["x"])
    x = x.float() if not x.is_floating_point() else x
    y = d.get("y")
    return x, (torch.as_tensor(y).long() if y is not None else None)


def _fit_shape(x: torch.Tensor, shape: tuple, where: str) -> torch.Tensor:
    if tuple(x.shape[1:]) == shape:
        return x
    per = 1
    for s in shape:
        per *= s
    if x[0].numel() == per:
        return x.reshape(len(x), *shape)
    raise CLIError(f"--data {where}: examples have shape {tuple(x.shape[1:])}, the model takes {shape}; "
                   "pass --input-shape to match")


def _align(args, rm, spec, a, b, data: _Data | None):
    from .plugins._align import align_states

    options = {"seed": args.seed}
    if args.method == "weight":
        options.update(restarts=args.restarts, max_iter=args.max_iter)
    elif args.method == "ste":
        options.update(steps=args.steps, lr=args.lr)
    t = time.perf_counter()
    try:
        aligned, perms = align_states(spec, [a, b], args.method, model=rm.module, inputs=data and data.inputs,
                                      labels=data and data.labels, **options)
    except RuntimeError as e:
        if "not available" in str(e):
            raise CLIError(str(e)) from e
        raise
    except ValueError as e:  # bad weights (NaN, a dtype): name the files, not the matcher's arguments
        raise CLIError(str(e).replace("state_a", args.a).replace("state_b", args.b)) from e
    perm = perms[1]
    from .permutation import units_moved

    moved = units_moved(perm)
    _log(args, f"{args.method} matching: {moved} of {spec.num_rows} units moved, {time.perf_counter() - t:.1f} s")
    return aligned[1], perm


def _verify(args, rm, b, aligned):
    """Whether aligned B computes what B computes on the example inputs (a Verdict; dtype-aware)."""
    from .equivalence import same_function

    try:
        return same_function(rm.module, b, aligned, rm.example_inputs, tol=VERIFY_TOL)
    except ValueError as e:  # the model fails on its example inputs, or gives NaN
        raise CLIError(f"cannot check the aligned model: {e}") from e


# -- commands -------------------------------------------------------------------------------------
def cmd_inspect(args) -> int:
    from .folder import is_model_folder
    from .io import write_text

    if is_model_folder(args.model):
        from .folder._cli import inspect_folder

        spec, rm, err = inspect_folder(args, lambda m: _log(args, m))
    else:
        rm = _resolve(args)
        spec = _infer(args, rm)
        err = None
    if args.check and err is None:  # on perturbed weights: zero-initialised heads could hide a wrong permutation
        from .check import randomize_
        from .equivalence import invariance_verdict

        err = invariance_verdict(randomize_(copy.deepcopy(rm.module)), spec, rm.example_inputs, tol=VERIFY_TOL)
    if args.json:
        text = spec.to_json(indent=2) + "\n"
    else:
        text = format_spec(spec, rm, verbose=args.verbose, invariance=err)
    if args.output:
        write_text(args.output, text)
        _log(args, f"wrote {args.output}")
    else:
        sys.stdout.write(text)
    return EXIT_CHECK_FAILED if err is not None and not err.ok else 0


def cmd_align(args) -> int:
    from .io import permutation_to_dict, save_checkpoint, write_text

    inputs = (args.a, args.b)
    for extra in (args.output, args.perm_out, args.spec_out):
        if extra and any(_same_path(extra, i) for i in inputs):
            raise CLIError(f"refusing to write {extra}: it is an input; choose another path")
    from .folder import is_model_folder

    if is_model_folder(args.a) or is_model_folder(args.b):
        from .folder._cli import align_folder_pair

        return align_folder_pair(args, lambda m: _log(args, m))
    rm = _resolve(args)
    spec = _infer(args, rm)
    a, b = _load_pair(args, rm)
    data = _load_data(args, rm, need_labels=False) if args.method != "weight" else None
    aligned, perm = _align(args, rm, spec, a, b, data)
    if not args.no_verify:
        verdict = _verify(args, rm, b, aligned)
        if not verdict.ok:
            print(f"autoperm align: error: aligned B does not compute what B computes on the example input "
                  f"({verdict}); nothing written. This is a bug in the inferred spec; please report it with "
                  "`autoperm inspect --check`.", file=sys.stderr)
            return EXIT_CHECK_FAILED
        _log(args, f"check: aligned B computes what B computes ({verdict})")
    meta = {"autoperm_version": _version(), "aligned_to": os.path.basename(args.a),
            "source": os.path.basename(args.b), "method": args.method, "model": args.model}
    save_checkpoint(aligned, args.output, inputs=inputs, metadata=meta)
    _log(args, f"wrote {args.output}")
    if args.perm_out:
        write_text(args.perm_out, json.dumps(permutation_to_dict(perm)) + "\n", inputs=inputs)
    if args.spec_out:
        write_text(args.spec_out, spec.to_json(indent=2) + "\n", inputs=inputs)
    return 0


def cmd_barrier(args) -> int:
    try:
        from .barrier import evaluator, has_batchnorm, interpolation_curve
        from .barrier.report import barrier_table, endpoint_table
    except ImportError as e:  # pragma: no cover - the barrier package ships with autoperm
        raise CLIError(f"barrier evaluation is not available: {e}") from e
    import numpy as np

    from .folder import is_model_folder
    from .io import write_text

    if is_model_folder(args.a) or is_model_folder(args.b):
        raise CLIError("barrier does not take model folders yet (language models need token data with labels); "
                       "align them with `autoperm align A_DIR B_DIR -o OUT_DIR`")
    rm = _resolve(args)
    spec = _infer(args, rm)
    a, b = _load_pair(args, rm)
    data = _load_data(args, rm, need_labels=True)
    aligned, _ = _align(args, rm, spec, a, b, data)
    lambdas = np.linspace(0.0, 1.0, max(2, args.points))
    evaluate = evaluator(data.splits)
    reset = None
    if has_batchnorm(rm.module) and not args.no_reset_bn:
        reset = data.inputs
        _log(args, "BatchNorm statistics are recomputed on the data at every λ (--no-reset-bn to keep them)")
    curves = {}
    for label, state in (("naive", b), (args.method, aligned)):
        t = time.perf_counter()
        curves[label] = interpolation_curve(rm.module, a, state, evaluate, lambdas, reset_bn=reset)
        _log(args, f"{label} curve: {len(lambdas)} points, {time.perf_counter() - t:.1f} s")
    print(barrier_table(curves))
    print()
    print(endpoint_table(curves))
    if args.plot:
        from .barrier.plot import plot_curves

        plot_curves(curves, args.plot, title=f"{args.model}: naive vs {args.method}")
        _log(args, f"wrote {args.plot}")
    if args.json_out:
        out = {label: {**c.to_dict(), "barriers": {f"{m} {k}": v for (m, k), v in c.barriers().items()}}
               for label, c in curves.items()}
        write_text(args.json_out, json.dumps(out, indent=2) + "\n", inputs=(args.a, args.b))
    return 0


def cmd_mergekit(args) -> int:
    from .plugins.mergekit import run

    try:
        return run(args)
    except (FileNotFoundError, ValueError) as e:
        raise CLIError(str(e)) from e


def cmd_zoo(args) -> int:
    try:
        from .zoo import main as zoo_main
    except ImportError as e:
        raise CLIError(f"the zoo harness (autoperm.zoo) is not available in this version: {e}") from e
    return zoo_main(args.args) or 0


def _same_path(a: str, b: str) -> bool:
    from .io import _same_file

    return _same_file(a, b)


# -- the inspect table ----------------------------------------------------------------------------
def format_spec(spec, rm=None, verbose: bool = False, invariance=None) -> str:
    """The human-readable ``inspect`` report: a summary line, the groups table, pinned axes, unsupported ops."""
    lines = []
    if rm is not None:
        shapes = ", ".join("x".join(map(str, s)) for s in rm.input_shapes)
        lines.append(f"{rm.name} ({rm.source}), example input {shapes}")
    n_pins = len(_unique_pins(spec))
    n_blocks = len(set(spec.per.values()))
    per = (f" ({len(spec.per)} of them per block of another group, {n_blocks} block group{'s' if n_blocks != 1 else ''})"
           if spec.per else "")
    lines.append(f"{len(spec.group_sizes)} groups{per}, {spec.num_units} permutable units, "
                 f"{100 * spec.permuted_fraction():.1f}% of state-dict elements in tensors with a permuted axis, "
                 f"{n_pins} pinned axes, {len(spec.unsupported)} unsupported ops")
    if invariance is not None:  # a Verdict (autoperm.equivalence)
        lines.append(f"invariance check after a random permutation of every group: {invariance} "
                     f"({'ok' if invariance.ok else 'FAILED'})")
    lines.append("")
    rows = []
    for grp in spec.groups:
        blocks = sorted({spec.locate(m.key, m.axis, grp.name)[1] for m in grp.members})
        tensors = len({m.key for m in grp.members})
        forms = sorted({render_expr(m.expr, spec, grp.name) for m in grp.members}, key=len)
        members = f"{len(grp.members)} axes" + (f" in {tensors} tensors" if tensors != len(grp.members) else "")
        rows.append([grp.name, str(grp.size), "/".join(map(str, blocks)), members, _clip(", ".join(forms), 60)]
                    + ([grp.per or ""] if spec.per else []))
    lines += _table(["group", "size", "width", "members", "structure"] + (["per block of"] if spec.per else []), rows)
    if spec.per:
        lines.append("")
        lines += format_blocks(spec)
    if verbose:
        for grp in spec.groups:
            lines.append("")
            lines.append(f"{grp.name} ({grp.size}):")
            lines += [f"  {m.key}:{m.axis}  {render_expr(m.expr, spec, grp.name)}" for m in grp.members]
    if spec.modules:  # whole modules (experts in a ModuleList) that move with a group's units
        lines.append("")
        lines.append(f"module groups ({len(spec.modules)}; each unit of the group is a whole module, which moves "
                     "with its own groups):")
        lines += _table(["group", "modules", "own groups per module"],
                        [[m.axis, f"{m.prefixes[0]}* ... {m.prefixes[-1]}* ({len(m.prefixes)})",
                          str(len(m.local))] for m in spec.modules], indent=2)
    pins = _unique_pins(spec)
    lines.append("")
    lines.append(f"pinned axes ({len(pins)}):" if pins else "pinned axes: none")
    lines += _table(["axis", "size", "reason"], [[f"{p.key}:{p.axis}", str(p.size), p.reason] for p in pins], indent=2)
    if spec.unsupported:
        lines.append("")
        lines.append(f"unsupported ops ({len(spec.unsupported)}; their tensors are pinned):")
        lines += [f"  {u}" for u in spec.unsupported]
    lines.append("")
    lines.append("structure: [n] is this group, other numbers are other groups' sizes, 'fixed:n' never moves; "
                 "x is a product, + a concatenation. width: indices each unit moves together."
                 + (" A size marked * permutes independently in every block of another group (its 'per block of' "
                    "column): e.g. heads 6 x dim 64* is 6 heads, each with its own permutation of its 64 dims."
                    if spec.per else ""))
    return "\n".join(lines) + "\n"


def render_expr(expr, spec, mark: str | None = None) -> str:
    """A short text form of an axis expression: ``[3]x64`` is group ``mark`` (size 3) times a size-64 group.

    >>> from autoperm.spec import PermutationSpec
    >>> w = {"cat": [{"fixed": 2}, {"prod": [{"g": "h"}, {"g": "d"}]}]}
    >>> s = PermutationSpec.from_axes({"w": [w]}, {"h": 3, "d": 4})
    >>> render_expr(s.axes["w"][0], s, "h")
    'fixed:2 + [3]x4'
    >>> heads = PermutationSpec.from_axes({"w": [w]}, {"h": 3, "d": 4}, per={"d": "h"})
    >>> render_expr(heads.axes["w"][0], heads, "h")
    'fixed:2 + [3]x4*'
    """
    if expr is None:
        return "-"
    if "g" in expr:
        size = spec.group_sizes[expr["g"]]
        star = "*" if expr["g"] in spec.per else ""
        return f"[{size}]{star}" if expr["g"] == mark else f"{size}{star}"
    if "fixed" in expr:
        return f"fixed:{expr['fixed']}"
    kind, parts = next(iter(expr.items()))
    inner = [render_expr(e, spec, mark) for e in parts]
    if kind == "prod":
        return "x".join(f"({s})" if " + " in s else s for s in inner)
    return " + ".join(inner)


def format_blocks(spec) -> list[str]:
    """The block structure of a spec, one row per block group: how many blocks it has and the groups
    each of its blocks permutes on its own (with their sizes). Empty when no group is per block.

    >>> from autoperm.spec import PermutationSpec
    >>> qkv = {"prod": [{"g": "heads"}, {"cat": [{"g": "qk"}, {"g": "v"}]}]}
    >>> spec = PermutationSpec.from_axes({"w": [qkv]}, {"heads": 6, "qk": 64, "v": 64}, per={"qk": "heads", "v": "heads"})
    >>> print("\\n".join(format_blocks(spec)))
    block structure: 2 groups permute independently in every block of 1 block group
      block group  blocks  its own permutation in every block, of
      -----------  ------  --------------------------------------
      heads        6       qk (64), v (64)
    """
    if not spec.per:
        return []
    inner: dict[str, list[str]] = {}
    for d in spec.group_sizes:
        if d in spec.per:
            inner.setdefault(spec.per[d], []).append(d)
    rows = [[b, str(spec.group_sizes[b]), ", ".join(f"{d} ({spec.group_sizes[d]})" for d in ds)]
            for b, ds in inner.items()]
    n = len(inner)
    head = (f"block structure: {len(spec.per)} group{'s' if len(spec.per) != 1 else ''} permute independently in "
            f"every block of {n} block group{'s' if n != 1 else ''}")
    return [head] + _table(["block group", "blocks", "its own permutation in every block, of"], rows, indent=2)


def _unique_pins(spec):
    seen, out = set(), []
    for p in spec.pinned:
        k = (p.key, p.axis, p.size, p.reason)
        if k not in seen:
            seen.add(k)
            out.append(p)
    return out


def _clip(s: str, n: int) -> str:
    return s if len(s) <= n else s[:n - 3] + "..."


def _table(header, rows, indent: int = 0) -> list[str]:
    if not rows:
        return []
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = " " * indent + "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + "  {}"
    return [fmt.format(*header).rstrip(), fmt.format(*("-" * w for w in widths)).rstrip(),
            *(fmt.format(*r).rstrip() for r in rows)]
