"""Files in and out: images and label maps with their geometry, intensity normalisation and
atomic writes. Knows nothing of networks or projects."""
