"""Experiment 5: merging several MNIST-5k MLPs (Git Re-Basin's MergeMany, its Algorithm 3).

Four 784-512-512-512-10 MLPs trained as in experiment 1 (seeds 1-4; 1 and 2 are experiment 1's
pair and reuse its cache when both write to the same ``--out``). Their weights are averaged
naively, after aligning every model to model 1 by weight matching, and after MergeMany
(each model aligned in turn to the mean of the others until a sweep changes nothing).
Git Re-Basin reports, for five full-MNIST MLPs, a merged test loss below every input model's.

    python examples/exp5_merge_many.py           # about 3 minutes on 2 cores

Writes ``<out>/exp5.json``.
"""
import os

import torch

import autoperm
from autoperm.barrier import average_states, evaluator, markdown_table, merge_models
from autoperm.data import mnist5k

from _common import cache_path, mlp, parse_args, save_json, timed, train


def main():
    args = parse_args(__doc__.splitlines()[0], "exp1", lambda p: (
        p.add_argument("--models", type=int, default=4),
        p.add_argument("--epochs", type=int, default=100)))
    data = mnist5k(standardize=False)
    ev = evaluator(data)
    models = []
    for seed in range(1, args.models + 1):
        torch.manual_seed(seed)
        models.append(train(mlp(784, [512] * 3), data, epochs=args.epochs, lr=1e-3, batch_size=500, seed=seed,
                            cache=cache_path(args, f"mlp512_e{args.epochs}_s{seed}")))
    states = [m.state_dict() for m in models]
    spec = autoperm.infer_spec(models[0], data.x_train[:2])
    work = mlp(784, [512] * 3)
    rows, out = [], {}

    def report(label, state, seconds=0.0, extra=""):
        work.load_state_dict(state)
        r = ev(work)
        out[label] = {**r, "seconds": seconds}
        rows.append([label, r["train_loss"], r["test_loss"], 100 * r["test_acc"], f"{seconds:.1f}{extra}"])

    for i, s in enumerate(states):
        report(f"model {i + 1}", s)
    report("naive average", average_states(states))
    res, sec = timed(merge_models, spec, states, method="reference")
    report("weight matching to model 1, average", res.state, sec)
    res, sec = timed(merge_models, spec, states, method="mergemany", seed=0)
    report("MergeMany (weight matching), average", res.state, sec, f" ({res.sweeps} sweeps)")
    print(markdown_table(["", "train loss", "test loss", "test acc %", "merge time (s)"], rows))
    save_json(os.path.join(args.out, "exp5.json"), out)


if __name__ == "__main__":
    main()
