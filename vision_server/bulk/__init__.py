"""The dataset captioner behind ``vision-server caption``: readers, preparation, outputs, pipeline.

The stages are plain functions and small classes over picklable records, so the local pipeline
(:mod:`vision_server.bulk.pipeline`: a bounded asyncio flow into the in-process engine) and a
distributed one (Ray Data's ``map_batches``) can share them:

- :mod:`~vision_server.bulk.readers`: inputs (files, folders, path lists, Parquet, WebDataset
  tar shards) → a stream of :class:`~vision_server.bulk.records.Record`.
- :mod:`~vision_server.bulk.plan`: per record, which tasks still need a caption (resume).
- :mod:`~vision_server.bulk.prepare`: ``prepare_record`` turns a record into the model-size
  :class:`~vision_server.images.PreparedImage` (a top-level function: worker processes, Ray tasks).
- :func:`~vision_server.bulk.pipeline.caption_image`: one prepared image, every task, through an
  :class:`~vision_server.engine.scheduler.Engine` (which batches across concurrent calls).
- :mod:`~vision_server.bulk.outputs`: sidecar files, JSON Lines and Parquet, written safely;
  ``make_row`` is the one row shape of both table outputs.
"""
