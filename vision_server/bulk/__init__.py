"""The dataset captioner behind ``vision-server caption``: readers, preparation, outputs, pipeline.

The stages are plain functions and small classes over picklable records, so the local pipeline
(:mod:`vision_server.bulk.pipeline`: a bounded asyncio flow into the in-process engine) and a
distributed one (Ray Data's ``map_batches``) can share them:

- :mod:`~vision_server.bulk.readers`: inputs (files, folders, path lists, Parquet, WebDataset
  tar shards) → a stream of :class:`~vision_server.bulk.records.Record`.
- :mod:`~vision_server.bulk.plan`: per record, which tasks still need a caption (resume).
- :mod:`~vision_server.bulk.prepare`: bytes → model-size pixels, in worker processes.
- :mod:`~vision_server.bulk.outputs`: sidecar files, JSON Lines and Parquet, written safely.
"""
