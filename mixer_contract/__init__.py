"""The contract both sides of the wire share: the batch wire format, the errors and their problem+json
table, the bounded value types, and the job / schedule documents with their one ``parse`` and canonical
``to_json``.

It imports only the standard library and numpy (zstandard, zlib-ng and Pillow on first use, for zstd
payloads, the frame checksum and image samples), so the engine, the sources, the client and the trainer
import it without the server's dependencies; ``tests/contract/test_layering.py`` keeps it that way.
"""
