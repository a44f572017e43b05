"""rs-pseudolabel: a teacher labels unlabeled images, the labels are filtered and balanced,
and a noised student trains on them (ResNet-RS and Noisy Student with PyTorch, timm, Apache
Beam and WebDataset).

The one name this project installs. Its subpackages are the repository's top-level folders
(`data`, `teachers`, `students`, `pipeline`, `configs`): a wheel holds them under this
package (pyproject.toml's package-dir), and in a checkout the folders beside this one are
where they are looked up, so a checkout runs its own code even when another is installed.
"""

from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parent.parent
if (_CHECKOUT / "pyproject.toml").is_file() and (_CHECKOUT / "pipeline" / "cli.py").is_file():
    __path__.append(str(_CHECKOUT))
