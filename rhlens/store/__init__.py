"""The store: how rhlens writes and reads what it computes.

* :mod:`.files`: atomic text and JSON (the one ``write_json``), JSON and JSONL read back;
* :mod:`.results`: the one save/load protocol (``Result``, ``Config``, ``load_result``);
* :mod:`.registry`: where each kind of result lives (results register themselves);
* :mod:`.logs`: folder locks, append-only run logs that resume, shard logs and their merge;
* :mod:`.identity`: a run's identity (everything that shapes its results);
* :mod:`.layout`: the name of every file a run folder holds; :mod:`.runs`: reading it back.

This package imports nothing at its top, so that its light parts (``registry``, ``layout``)
cost nothing to import.
"""
