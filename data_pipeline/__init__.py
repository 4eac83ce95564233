"""Tokenised WebDataset shards (`python -m data_pipeline.prepare`) and a resumable streaming loader
(`data_pipeline.loader.build_loader`). See data_pipeline/README.md."""
