"""From the archive to validated inputs: discovery and classification of DICOM
series (:mod:`.discover`, :mod:`.classify`), conversion to NIfTI (:mod:`.ingest`,
:mod:`.convert`, dcm2niix) and acquisition parameters (:mod:`.params`)."""
