"""Brain alignment (docs/methods.md §9.5–9.6): voxelwise ridge encoding of THINGS-fMRI and BOLD5000 single-trial
responses from base and meta-learned representations, with leakage-free cross-validation, ROI statistics and figures.

Modules: `hdf` (pandas' fixed HDF5 frames via h5py), `subject` (the prepared per-subject file), `things` and
`bold5000` (readers of the released files), `cv` (fold schemes), `ridge` (grouped-CV ridge, one α per voxel),
`encoding` (per-subject encoding job), `stats` (noise ceiling, sign-flip, Fisher, BH-FDR, ROI summaries),
`figures`, `cli`.
"""
