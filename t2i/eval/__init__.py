"""Evaluation: sampling (`sampling`, `sample_folder`), prompt sets (`prompts`), GenEval's rules
(`geneval`), folder scoring (`geneval_folder`) and backends (`backends`, `detectors`,
`shapes_detector`), FID / KID (`fid`), CLIP score (`clipscore`) and exposure bias (`slowflow`).
The protocol is in docs/design/evaluation.md."""
