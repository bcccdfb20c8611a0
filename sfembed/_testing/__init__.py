"""The local SiliconFlow-compatible server and the private Redis server behind
:mod:`sfembed.testing`, one module per part: ``settings`` (configuration, statistics, constants),
``errors`` (the provider's error answers), ``tokenizer`` (the server's own token counts), ``calls``
(a request body read and checked), ``bodies`` (vectors and success bodies, damaged ones too),
``expected`` (what the server answers for an item), ``quota`` (per-model windows), ``faults``
(scripted and drawn), ``answers`` (headers and the faults' answers), ``server`` (``LocalServer``)
and ``redis_server``. Only ``sfembed._models`` and ``sfembed._types`` come from the engine."""
