"""The README.md card written with every product profile, so that a profile published as a folder (on the Hub or a
share) says what its verdicts promise: the references, the thresholds and the false-alarm rate they guarantee."""

CARD_FILE = "README.md"
ASSUMPTION = ("The rate holds for new good parts that come from the same process as the reference images (same product, "
              "camera, lighting and variation): their scores and the references' leave-one-out scores are then exchangeable "
              "(docs/METHODS.md, \"Calibrated false-alarm rate\").")


def profile_card(profile) -> str:
    """The card of ``profile`` (a ``zsad.ProductProfile``) as Markdown with a Hub metadata header."""
    lines = [
        "---", "library_name: zsad", "tags:", "- anomaly-detection", "- zsad-product-profile", "---", "",
        f"# Product profile: {profile.class_name} ({profile.method})", "",
        f"A zsad product profile: {profile.describe()}.", "",
        f"- backbone: `{profile.backbone}` (revision {profile.backbone_revision}), {profile.image_size} px, "
        f"layers {profile.feature_layers}, value-value stream from {profile.memory.vv_attention_from}",
        f"- reference-map share in the fused map: {profile.fusion.weight:g}",
        f"- created {profile.created} with zsad {profile.zsad_version}", "",
        "Use it with `zsad predict IMAGES --model MODEL --profile THIS_FOLDER` (the same method and backbone).", "",
        "## Verdicts and their false-alarm rate", "",
    ]
    calibration = profile.calibration
    if calibration is None:
        return "\n".join(lines + ["Uncalibrated: one reference image gives no leave-one-out score, so the threshold is 0.5 and "
                                  "no false-alarm rate is stated. Add good images (`zsad calibrate --add MORE_GOOD/ --out "
                                  "THIS_FOLDER`).", ""])
    asked = f", asked {calibration.false_alarm_target:g}" if calibration.false_alarm_target is not None else ""
    lines += [
        f"- rule: {calibration.rule}{asked}; image threshold {calibration.image_threshold:.4f}, "
        f"pixel threshold {calibration.pixel_threshold:.4f}",
        f"- good parts flagged: {calibration.rate_statement()}",
        f"- measured on the references (leave-one-out): {calibration.false_alarm_rate():.1%} of {calibration.num_good} flagged",
    ]
    if calibration.false_alarm_bound is not None:
        lines += ["", ASSUMPTION]
    return "\n".join(lines + [""])
