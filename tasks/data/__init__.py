"""The prepare stage: raw input files to the prepared folder every later stage reads.

- ``datasets``: find, download or generate a data set and read its ratings (DuckDB, ``sql/``);
  ``generated``: the data sets made on first use (planted drift); ``features``: side features;
- ``prepare``: ingest, split, candidates, stats, then seal the folder; ``prepared``: what a
  prepared folder holds, its check and its loading;
- ``input_hashes``: content hashes of the raw files (the prepared data's key), cached.

May import: ``metarec``, ``tasks.runtime`` and ``data`` itself.
"""
