"""Images for a sweep: data sets and class-balanced selection (`datasets`), parallel decoding (`decode`), and the
on-disk cache of decoded images (`image_cache`)."""
