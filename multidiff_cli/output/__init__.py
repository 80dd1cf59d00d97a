"""What multidiff writes: PNGs with their metadata, layout previews and contact sheets, printed reports."""
