"""Tools around the data: ``mmscene data inspect`` (what a model would see from a shard, in the
terminal or as HTML) and ``mmscene data demo`` (a synthetic four-scenario dataset a tiny CPU
model learns from, with its own small tokenizer).
"""
