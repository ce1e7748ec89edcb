"""qmriflow: quantitative T1/T2/PD and fat/water maps from routine clinical MRI archives."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("qmriflow")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
