"""Where the GPU scripts (step_profile, overlap_bench, matmul_bench) put their JSON: $OUT (the device tool)
or out/ (git-ignored)."""
import json
import os


def write_result(name: str, result: dict) -> str:
    out_dir = os.environ.get("OUT") or "out"
    os.makedirs(out_dir, exist_ok=True)
    dest = os.path.join(out_dir, name)
    with open(dest, "w") as f:
        json.dump(result, f, indent=1)
    return dest
