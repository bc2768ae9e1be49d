"""The modelled MBU / MFU report of rpa (README): Llama-3-8B decode and prefill scenarios per TPU
generation, timed by the cost model on rpa.traffic with the block sizes the table lookup returns."""

from __future__ import annotations

import warnings

from autotune.cost_model import predict
from autotune.hardware import TPU_GENERATIONS
from autotune.tables import lookup
from rpa.config import make_key
from rpa.traffic_model import traffic, uniform_batch

LLAMA3_8B = dict(num_q_heads=32, num_kv_heads=8, head_dim=128, q_dtype="bfloat16", kv_dtype="bfloat16")


def recommended_page_size(max_model_len: int) -> int:
    """Page size for a model length: large pages cut the per-DMA cost; 128 tokens once contexts reach 2k."""
    return 128 if max_model_len >= 2048 else 32


def model_key(model: dict, num_tokens: int, max_model_len: int) -> dict:
    """make_key for a model dict like LLAMA3_8B, at the recommended page size."""
    return make_key(model["q_dtype"], model["kv_dtype"], model["num_q_heads"], model["num_kv_heads"],
                    model["head_dim"], recommended_page_size(max_model_len), num_tokens, max_model_len)


def model_scenarios(model: dict = LLAMA3_8B) -> dict[str, tuple[dict, dict]]:
    """name -> (uniform_batch, table key) of the report's scenarios: decode of 64 sequences at 2k and
    8k context, one 2048-token prefill."""
    out = {}
    for ctx in (2048, 8192):
        ps = recommended_page_size(ctx)
        out[f"decode b64 ctx{ctx}"] = (uniform_batch([1] * 64, [ctx] * 64, ps), model_key(model, 64, ctx))
    ps = recommended_page_size(2048)
    out["prefill 2048"] = (uniform_batch([2048], [2048], ps, decode_end=0), model_key(model, 2048, 2048))
    return out


def model_report(generations: tuple[str, ...] = TPU_GENERATIONS, model: dict = LLAMA3_8B) -> list[dict]:
    """Modelled ("model") decode MBU and prefill MFU per generation, with the block sizes the lookup
    returns. Returns one row per (generation, scenario): generation, scenario, page_size, match,
    block_sizes, seconds, mbu, mfu, bound, label."""
    rows = []
    for gen in generations:
        for name, (batch, key) in model_scenarios(model).items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a table miss warns; the heuristic is what runs
                bs, match = lookup("rpa", key, gen)
            p = predict(traffic(batch, bs, **{k: model[k] for k in LLAMA3_8B}), gen)
            rows.append(dict(generation=gen, scenario=name, page_size=batch["page_size"], match=match,
                             block_sizes=dict(bs), seconds=p.seconds, mbu=p.mbu, mfu=p.mfu, bound=p.bound,
                             label="model"))
    return rows

