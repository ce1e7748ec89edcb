"""Synthetic phantoms: anatomy, MR signal simulation and scanner-like DICOM export."""
