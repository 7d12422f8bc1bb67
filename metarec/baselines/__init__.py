"""Baselines of the paper (RKMF, sRec, SPMF) and two more (MF-FT, Pop), behind one interface."""
