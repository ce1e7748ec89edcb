"""qmriflow: quantitative T1/T2/PD and fat/water maps from routine clinical MRI archives.

Packages in the order the data flows: :mod:`.archive` (discovery, conversion, parameters),
:mod:`.preproc` (registration, N4, skull strip, segmentation), :mod:`.model` (the relaxometry
network, training, inference, calibration), :mod:`.cse` (fat/water), :mod:`.stats` (tables,
reports), :mod:`.workflow` (runs, nightly, demo, failures, provenance) and :mod:`.cli` (the
``qmriflow`` entry point); :mod:`.phantom` is the test phantom. The shared foundation:
:mod:`.physics` and :mod:`.epg` (every signal equation), :mod:`.io`, :mod:`.errors`,
:mod:`.config`; :mod:`.synth` synthesises images from maps.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("qmriflow")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
