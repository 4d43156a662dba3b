"""Shards → batches, the path of one training sample, in the order it takes:

1. :mod:`.stream`: one shard stream per source, rank and loader worker; reads sample locations
   with :mod:`mmscene.data.tar_reader`, shuffles them in a bounded buffer, and reads a sample's
   bytes when it is picked.
2. :mod:`.mixer`: draws a source by weight, has its scenario plugin ``load`` and ``format`` the
   sample (:func:`~.mixer.prepare_sample`), counts skips, and carries the resumable state.
3. :mod:`.encode`: the prompt through the chat template (:mod:`.chat_template`) → token ids with
   expanded image tokens, loss mask, pixels.
4. :mod:`.batching` and :mod:`.packing`: a token budget per batch, or rows packed first-fit.
5. :mod:`.collate`: padded (or packed) tensors.

Evaluation reads each rank's share of the shards in order (:mod:`.eval_samples`) and goes
through the same ``prepare_sample``. Nothing here imports the model or transformers.
"""
