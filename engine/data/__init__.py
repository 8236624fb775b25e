"""Images and where they live: decoding, ingest, WebDataset shards and their tar reader, storage
(local paths, s3:// and gs:// URIs), the pseudo-label table on disk, synthetic data."""
