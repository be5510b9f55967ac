#!/usr/bin/env bash
# Second venv for mmclin: scikit-survival 0.28.0 (an mmclin pin) needs numpy>=2, the peers need numpy<2.
# Same torch (local CPU wheel, installed first, pinned by constraints.txt).
set -euo pipefail
cd "$(dirname "$0")"
python3.11 -m venv venv-mm
./venv-mm/bin/pip install -q --upgrade pip
./venv-mm/bin/pip install torch==2.13.0
./venv-mm/bin/pip install -c constraints.txt -e "${MMCLIN_SRC:-../..}"
./venv-mm/bin/python -c "import torch, numpy, polars, lightning, mmclin; print('torch', torch.__version__, 'numpy', numpy.__version__, 'polars', polars.__version__, 'lightning', lightning.__version__, 'mmclin', mmclin.__version__)"
./venv-mm/bin/pip freeze --exclude-editable > requirements-lock-mm.txt
