"""The ablation method of the reasoning chain (seed 003), shared by feature_ablation (the top-k
features of a model) and circuit_discovery (clusters of them): attribution of SAE features to the
correct answer, random feature sets matched to a chosen set (the null), greedy answers under
zero-ablation, and the paired accuracy statistics."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from contextlib import ExitStack
from typing import TYPE_CHECKING, cast

import h5py
import numpy as np
from tqdm import tqdm

from common.batching import GenerationMemory, generation_memory
from common.edits import BatchRows, edit_block_output, zero_features
from common.errors import UserError
from common.generation import greedy, left_padded
from common.lazy import lazy_import, no_grad
from common.models import parameter_bytes, text_config
from common.paired import mcnemar, proportion_difference_interval
from jobs._reasoning import teacher_forced
from jobs._reasoning.problems import Benchmark

if TYPE_CHECKING:
    import pandas as pd
    import torch
else:
    pd = lazy_import("pandas")
    torch = lazy_import("torch")


def generation_memory_of(config, dtype: str, widths: list[int], prompt_tokens: int,
                         new_tokens: int) -> GenerationMemory:
    """Weights and SAEs; per row its cache and forward, and one layer's SAE codes at every prompt
    position (three such tensors at once inside zero_features: the codes, the chosen ones, their decoding)."""
    hidden = text_config(config).hidden_size
    return generation_memory(text_config(config), dtype,
                             parameter_bytes(config, dtype) + sum(2 * hidden * width * 4 for width in widths),
                             prompt_tokens, new_tokens, extra_per_row=3 * prompt_tokens * max(widths) * 4)


def attribution(model, tokenizer, bench: Benchmark, items: list, saes: dict,
                device: torch.device) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """Per layer, (items, features): each feature's activation x gradient of the reference
    solution's log-probability, summed over the positions the ablation acts on (all but special
    tokens), one row per item; and on how many positions each feature was active."""
    scores: dict[int, list[torch.Tensor]] = {layer: [] for layer in saes}
    active = {layer: torch.zeros(sae.cfg.d_sae, dtype=torch.long) for layer, sae in saes.items()}
    d_model = text_config(model.config).hidden_size
    for start in range(0, len(items), 4):
        ids, mask, solution, positions = teacher_forced(tokenizer, bench, items[start : start + 4], device)
        outputs: dict[int, torch.Tensor] = {}
        deltas: dict[int, torch.Tensor] = {}
        with ExitStack() as stack:
            for layer in saes:
                deltas[layer] = torch.zeros(*ids.shape, d_model, device=device, dtype=model.dtype, requires_grad=True)
                stack.enter_context(edit_block_output(model, layer, _recorder(outputs, deltas, layer)))
            with torch.enable_grad():
                logits = model(input_ids=ids, attention_mask=mask).logits.float()
                log_probs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
                (log_probs * solution[:, 1:]).sum().backward()
        with torch.no_grad():
            for layer, sae in saes.items():
                features = sae.encode(outputs[layer].to(sae.dtype)) * positions[..., None]
                gradient = cast("torch.Tensor", deltas[layer].grad).to(sae.dtype) @ sae.W_dec.T  # set by backward
                scores[layer].append((features * gradient).sum(1).double().cpu())
                active[layer] += (features != 0).flatten(0, 1).sum(0).cpu()
    return ({layer: torch.cat(rows).numpy() for layer, rows in scores.items()},
            {layer: values.numpy() for layer, values in active.items()})


def _recorder(outputs: dict, deltas: dict, layer: int):
    """An edit that keeps block `layer`'s output and adds the zero tensor whose gradient is the output's."""

    def record(hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        outputs[layer] = hidden.detach()
        return hidden + deltas[layer]

    return record


def top_features(scores: dict[int, np.ndarray], k: int) -> np.ndarray:
    """(k, 2) [layer, feature] of the k highest scores over all layers (ties: lower layer, lower id)."""
    pairs = [(layer, feature) for layer in sorted(scores) for feature in range(len(scores[layer]))]
    values = np.concatenate([scores[layer] for layer in sorted(scores)])
    order = np.argsort(-values, kind="stable")[:k]
    return np.asarray([pairs[i] for i in order], dtype=np.int64)


def control_sets(active: dict[int, np.ndarray], top: np.ndarray, sets: int, seed: int, unit_id: str,
                 excluded: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """`sets` random sets of [layer, feature] matched to `top`: for each top feature, one of the
    max(4, sets, len(top)) other features of its layer whose activation count on the attribution items is
    nearest its own (log scale; active ones first), never one of `excluded` ([layer, feature]
    rows), no feature twice in a set; seeded by `seed` and the unit. Named control_00, control_01, ..."""
    rng = np.random.default_rng([seed, zlib.crc32(unit_id.encode())])
    taken = {tuple(pair) for pair in top.tolist()} | {tuple(pair) for pair in ([] if excluded is None
                                                                              else excluded.tolist())}
    pools = []
    for layer, feature in top.tolist():
        others = np.asarray([f for f in range(len(active[layer])) if (layer, f) not in taken])
        distance = np.abs(np.log1p(active[layer][others]) - np.log1p(active[layer][feature]))
        order = np.lexsort((distance, active[layer][others] == 0))  # active features first, then the nearest
        pools.append([(layer, int(f)) for f in others[order][: max(4, sets, len(top))]])
    drawn = {}
    for index in range(sets):
        chosen: list[tuple[int, int]] = []
        for pool in pools:
            free = [pair for pair in pool if pair not in chosen]
            chosen.append(free[rng.integers(len(free))])
        drawn[f"control_{index:02d}"] = np.asarray(sorted(chosen), dtype=np.int64)
    return drawn


@no_grad
def ablate_and_generate(model, tokenizer, bench: Benchmark, items: list, saes: dict,
                        ablations: dict[str, np.ndarray], rows_per_call: int, device: torch.device,
                        desc: str = "") -> dict[str, tuple[list[str], list[str | None], list[bool]]]:
    """Greedy answers to every item unchanged ("baseline") and under each named ablation: the rows
    (item x condition, an item's conditions side by side) decoded `rows_per_call` at a time, so
    that an item of more conditions than fit at once is split across calls."""
    conditions = ["baseline", *ablations]
    results: dict[str, tuple[list, list, list]] = {c: ([], [], []) for c in conditions}  # texts, answers, correct
    pairs = [(item, condition) for item in items for condition in conditions]
    for start in tqdm(range(0, len(pairs), rows_per_call), desc=desc, unit="batch"):
        chosen = pairs[start : start + rows_per_call]
        prompts = [bench.prompt(item) for item, _ in chosen]
        encoded = left_padded(tokenizer, prompts, device)
        special = torch.tensor([tokenizer.get_special_tokens_mask(row.tolist(), already_has_special_tokens=True)
                                for row in encoded["input_ids"].cpu()], device=device).bool()
        positions = encoded["attention_mask"].bool() & ~special
        rows = BatchRows(len(prompts))
        with ExitStack() as stack:
            for layer, sae in saes.items():
                chosen_features = torch.zeros(len(prompts), sae.cfg.d_sae, dtype=torch.bool, device=device)
                for row, (_, name) in enumerate(chosen):
                    if name != "baseline":
                        features = ablations[name][ablations[name][:, 0] == layer, 1]
                        chosen_features[row, torch.as_tensor(features, device=device)] = True
                stack.enter_context(edit_block_output(model, layer, zero_features(sae, chosen_features, positions),
                                                      batch=rows))
            texts = greedy(model, tokenizer, prompts, bench.spec.max_new_tokens, device,
                           stop_strings=tuple(bench.stop_strings), batch=rows)
        for (item, condition), text in zip(chosen, texts, strict=True):
            answer, correct = bench.score(item, text)
            for store, value in zip(results[condition], (text, answer, correct), strict=True):
                store.append(value)
    return results


def rescore(unit: h5py.Group, load: Callable[[], Benchmark], field: str) -> None:
    """Read every condition's answers again from its stored texts, replacing its `correct` (and
    `answer`, where stored): reduce scores, so a fix to reading answers needs no GPU. Conditions
    stored without texts (shards of older versions) keep the flags scored on the GPU, and a unit
    with none needs no benchmark (`load` is not called)."""
    conditions: list[str] = []
    unit.visit(lambda name: conditions.append(name.rpartition("/")[0]) if name.rpartition("/")[2] == "text" else None)
    if not conditions:
        return
    bench = load()
    by_index = {item.index: item for item in bench.items}
    missing = sorted(set(unit["item"][()].tolist()) - set(by_index))
    if missing:
        raise UserError(f"{field}: the benchmark {bench.spec.name!r} no longer has the items {missing[:5]} that the "
                        f"run answered; restore the file ({bench.spec.path}) the run read, or rerun the job")
    items = [by_index[index] for index in unit["item"][()].tolist()]
    if "target" in unit and unit["target"].asstr()[()].tolist() != [item.target for item in items]:
        raise UserError(f"{field}: the reference answers of the benchmark {bench.spec.name!r} differ from those the "
                        f"run stored; restore the file ({bench.spec.path}) the run read, or rerun the job")
    for condition in conditions:
        group = unit[condition]
        scored = [bench.score(item, text) for item, text in zip(items, group["text"].asstr()[()], strict=True)]
        if "answer" in group:
            del group["answer"]
            group.create_dataset("answer", data=[answer or "" for answer, _ in scored], dtype=h5py.string_dtype())
        del group["correct"]
        group.create_dataset("correct", data=np.asarray([correct for _, correct in scored], dtype=bool))


def summarise(items: pd.DataFrame, by: list[str], alpha: float, success_drop: float) -> pd.DataFrame:
    """Per group of items: accuracies, drops, the top set's drop among the control sets' (the null),
    McNemar p-values and the seed's criterion. `control` and `control_drop` are the sets' means;
    the McNemar test against the control pairs the ablated answers with the control set that cost
    the most (the most conservative choice). The drop's interval is Agresti and Min's for paired
    proportions: a t interval on 0/1 differences shrinks to a point when no answer changes."""
    rows = []
    for keys, group in items.groupby(by, sort=True):
        controls = sorted(column for column in group if column.startswith("control_"))
        base, ablated = group["baseline"].to_numpy(bool), group["ablated"].to_numpy(bool)
        drop = base.mean() - ablated.mean()
        drop_low, drop_high = proportion_difference_interval(base, ablated)
        control_drops = np.asarray([base.mean() - group[c].mean() for c in controls])
        strongest = group[controls[int(np.argmax(control_drops))]].to_numpy(bool)
        p_vs_control = mcnemar(strongest, ablated)
        null_p = (1 + int((control_drops >= drop).sum())) / (1 + len(controls))
        rows.append({**dict(zip(by, keys, strict=True)), "items": len(group), "baseline": base.mean(),
                     "ablated": ablated.mean(), "control": float(np.mean([group[c].mean() for c in controls])),
                     "drop": drop, "drop_low": drop_low, "drop_high": drop_high, "control_drop": control_drops.mean(), "control_drop_max": control_drops.max(),
                     "control_sets": len(controls), "null_p_drop": null_p, "p_ablated": mcnemar(base, ablated),
                     "p_control": float(np.median([mcnemar(base, group[c].to_numpy(bool)) for c in controls])),
                     "p_ablated_vs_control": p_vs_control,
                     "criterion_met": bool(drop > success_drop and drop > control_drops.mean()),
                     "beats_control_significantly": bool(null_p < alpha and p_vs_control < alpha)})
    return pd.DataFrame(rows)

