"""Seed a frontier cache with the foundation issue's SmolLM2 measurements (scripts/smollm2_results.sh), so that
`python -m vllm_palu.eval frontier` does not spend the 2-core build machine re-measuring them: the dense KV
quantization baselines and the uniform joint-group checkpoints, same protocol, same code path (the uniform
allocation did not change). Usage: python scripts/frontier_seed.py FOUNDATION_DIR CACHE_DIR EVAL_TXT [MAX_TOKENS]
[QUANT_DIR]; QUANT_DIR (scripts/smollm2_latent_quant.sh's output) adds the uniform checkpoints' fp8 / int4 latent
points (rotation none; same ranks as the foundation checkpoints, checked).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(foundation: str, cache: str, eval_txt: str, max_tokens: str = "40000", quant: str | None = None) -> None:
    source, target = Path(foundation), Path(cache)
    (target / "ppl").mkdir(parents=True, exist_ok=True)
    protocol = {"data": str(Path(eval_txt).resolve()), "seq_len": 1024, "tokens": int(max_tokens)}
    for row in json.loads((source / "ppl-dense.json").read_text()):
        assert row["seq_len"] == 1024 and row["scored_tokens"] == (int(max_tokens) // 1024) * 1023
        seeded = {"ppl": row["ppl"], "scored_tokens": row["scored_tokens"], "protocol": protocol,
                  "seeded_from": str(source / "ppl-dense.json")}
        (target / "ppl" / f"dense-{row['kv_quant']}.json").write_text(json.dumps(seeded, indent=2) + "\n")
    for ratio in ("0.75", "0.5", "0.375", "0.25"):
        checkpoint = source / f"palu-r{ratio}-gall"
        link = target / f"palu-uniform-r{ratio}-gall"
        if not link.exists():
            link.symlink_to(checkpoint.resolve())
        palu = json.loads((checkpoint / "config.json").read_text())["palu"]
        row = json.loads((source / f"ppl-palu-r{ratio}-gall.json").read_text())[0]
        seeded = {"ppl": row["ppl"], "scored_tokens": row["scored_tokens"],
                  "protocol": {**protocol, "k_ranks": palu["k_ranks"], "v_ranks": palu["v_ranks"]},
                  "seeded_from": str(source / f"ppl-palu-r{ratio}-gall.json")}
        (target / "ppl" / f"{link.name}-latent-auto.json").write_text(json.dumps(seeded, indent=2) + "\n")
        for path in sorted(Path(quant).glob(f"ppl-palu-r{ratio}-rotnone-*.json")) if quant else []:
            quantized = json.loads((Path(quant) / f"palu-r{ratio}-rotnone" / "config.json").read_text())["palu"]
            assert (quantized["k_ranks"], quantized["v_ranks"]) == (palu["k_ranks"], palu["v_ranks"])
            for row in json.loads(path.read_text()):
                seeded = {"ppl": row["ppl"], "scored_tokens": row["scored_tokens"],
                          "protocol": {**protocol, "k_ranks": palu["k_ranks"], "v_ranks": palu["v_ranks"]},
                          "seeded_from": str(path)}
                # Rows written before the latent-format rename name the format in kv_quant.
                name = f"{link.name}-latent-{row.get('latent_format') or row['kv_quant']}.json"
                (target / "ppl" / name).write_text(json.dumps(seeded, indent=2) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
