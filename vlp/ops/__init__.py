"""Operations: the cluster launcher configs and job specs under ``ray_configs/``, checked offline."""
