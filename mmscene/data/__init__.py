"""The data side, in four stages a sample passes through in order.

- :mod:`mmscene.data.ingest`: annotations (LLaVA / M4-Instruct JSON, benchmark layouts) and
  their media → validated records → WebDataset shards (``mmscene data convert``).
- :mod:`mmscene.data.media`: safe decoders (image, video, mesh), the mesh renderer and the
  tower's pixel preprocessing, shared by the converter and the scenario plugins.
- :mod:`mmscene.data.pipeline`: shards → batches, the path of one training sample: tar reader →
  shuffled stream → mixer (plugin ``load``/``format``) → encode → batching/packing → collate.
- :mod:`mmscene.data.tools`: ``mmscene data inspect`` and the synthetic demo dataset.

The modules here at the root are what every stage shares: the shard folder format
(:mod:`~mmscene.data.shards`), the one tar reader (:mod:`~mmscene.data.tar_reader`) and the
seeded random streams (:mod:`~mmscene.data.seeds`).
"""
