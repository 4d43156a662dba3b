"""Annotations → shards: stream the annotation file (:mod:`.annotations`), turn each record into a
validated sample with its media bytes (:mod:`.records`), write shards and the index
(:mod:`.shard_writer`) and the report of what was rejected and why (:mod:`.report`).
:mod:`.convert` runs the whole (``mmscene data convert``); :mod:`.prompts` does the same for
``mmscene predict``'s prompt files.
"""
