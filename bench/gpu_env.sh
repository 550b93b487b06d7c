# Sourced by bench/gpu_check.sh and experiments/gpu_method.sh, with REPO and WORK set: puts the repository
# on the path through a folder of links in which urfm_fast/kernels points at kernels/ (the GPU machine gets
# a copy of the checkout, not an install), and keeps every cache inside WORK, offline. PYTHONSAFEPATH: no
# python started from these scripts puts its working directory (the repository root, whose urfm_fast/ has no
# kernels/) or a script's folder ahead of that folder of links.
mkdir -p "$WORK/src/urfm_fast"
for f in "$REPO"/urfm_fast/*; do
    [ "$(basename "$f")" = __pycache__ ] || ln -sfn "$f" "$WORK/src/urfm_fast/"
done
ln -sfn "$REPO/kernels" "$WORK/src/urfm_fast/kernels"
export PYTHONPATH="$WORK/src:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HF_HUB_OFFLINE=1 PIP_NO_INDEX=1
export TRITON_CACHE_DIR="$WORK/triton_cache" TORCHINDUCTOR_CACHE_DIR="$WORK/inductor_cache"
