"""Report templates of PhantomCXR: FINDINGS and IMPRESSION text that matches the image.

Each positive statement names its finding with its side, severity and zone words.
Absent findings are either negated ("No pneumothorax.") or not mentioned, and a
sentence never mixes a positive finding with a negation, so every sentence can be read
on its own. Normal studies often get one of a few fixed report texts, as radiologists
reuse macros, so identical reports recur word for word.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from .phantom_draw import nodule_diameter_mm, tube_tip_cm

if TYPE_CHECKING:
    from .phantom import Finding

NORMAL_MACRO_PROBABILITY = 0.5

# Fixed (findings, impression) texts reused verbatim for normal studies.
NORMAL_MACROS = (
    ("Heart size is normal. The lungs are clear. No pleural effusion or pneumothorax.",
     "No acute cardiopulmonary abnormality."),
    ("The cardiomediastinal silhouette is within normal limits. The lungs are clear bilaterally. "
     "There is no pleural effusion or pneumothorax. No acute osseous abnormality.",
     "No acute cardiopulmonary process."),
    ("Normal heart size. Lungs are clear. No effusion or pneumothorax.", "Normal chest radiograph."),
)

NORMAL_IMPRESSIONS = (
    "No acute cardiopulmonary abnormality.",
    "No acute cardiopulmonary process.",
    "No acute intrathoracic abnormality.",
    "Normal chest radiograph.",
)

NORMAL_HEART = (
    "Heart size is normal.",
    "The heart is normal in size.",
    "Normal heart size.",
    "The cardiomediastinal silhouette is within normal limits.",
    "The heart is not enlarged.",
)
CLEAR_LUNGS = (
    "The lungs are clear.",
    "The lungs are clear bilaterally.",
    "The lungs are well expanded and clear.",
    "Lungs are clear.",
)
NO_CONSOLIDATION = ("No focal consolidation.", "There is no focal airspace consolidation.",
                    "No airspace consolidation is seen.")
NO_NODULE = ("No suspicious pulmonary nodule.", "No pulmonary nodule or mass is seen.")
NO_EFFUSION_OR_PNEUMOTHORAX = ("No pleural effusion or pneumothorax.", "There is no pleural effusion or pneumothorax.",
                               "No pneumothorax or pleural effusion is seen.")
NO_EFFUSION = ("No pleural effusion.", "There is no pleural effusion.")
NO_PNEUMOTHORAX = ("No pneumothorax.", "There is no pneumothorax.")
BONES = ("No acute osseous abnormality.", "The visualized osseous structures are unremarkable.",
         "Osseous structures are intact.")

# Severity words per finding, indexed by mild / moderate / severe.
_SIZE = {"mild": "small", "moderate": "moderate", "severe": "large"}
_HEART_ADJECTIVE = {"mild": "mild", "moderate": "moderate", "severe": "marked"}
_HEART_ADVERB = {"mild": "mildly", "moderate": "moderately", "severe": "markedly"}
_CONSOLIDATION_ADJECTIVE = {"mild": "patchy", "moderate": "moderate", "severe": "dense"}
_ATELECTASIS_ADJECTIVE = {"mild": "minimal", "moderate": "moderate", "severe": "extensive"}

_LOBES = {
    ("right", "upper"): ("right upper lobe", "right upper lobe"),
    ("right", "middle"): ("right middle lobe", "right middle lobe"),
    ("right", "lower"): ("right lower lobe", "right lower lobe"),
    ("left", "upper"): ("left upper lobe", "left upper lobe"),
    ("left", "middle"): ("lingula", "lingular"),
    ("left", "lower"): ("left lower lobe", "left lower lobe"),
}
_ZONE_WORD = {"upper": "upper", "middle": "mid", "lower": "lower"}
_DEVICE_SIDE_WORD = {"left": "left", "right": "right"}


def format_report(findings_text: str, impression_text: str) -> str:
    """Join the two sections into the full report text."""
    return f"FINDINGS: {findings_text} IMPRESSION: {impression_text}"


def write_report(findings: Sequence[Finding], rng: np.random.Generator) -> tuple[str, str]:
    """Write the FINDINGS and IMPRESSION sections for the drawn findings.

    Args:
        findings: the study's findings, primary first; empty for a normal study.
        rng: generator that picks paraphrases and which absent findings to negate.

    Returns:
        (findings_text, impression_text), each one or more full sentences.
    """
    if not findings:
        if rng.random() < NORMAL_MACRO_PROBABILITY:
            return NORMAL_MACROS[rng.integers(len(NORMAL_MACROS))]
        return _findings_section(findings, rng), _pick(rng, NORMAL_IMPRESSIONS)
    return _findings_section(findings, rng), _impression_section(findings, rng)


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[rng.integers(len(options))]


def _capitalise(sentence: str) -> str:
    return sentence[:1].upper() + sentence[1:]


def _findings_section(findings: Sequence[Finding], rng: np.random.Generator) -> str:
    by_name = {f.name: f for f in findings}
    sentences = []

    if "support_device" in by_name:
        sentences.append(_device_sentence(by_name["support_device"], rng))

    if "cardiomegaly" in by_name:
        sentences.append(_cardiomegaly_sentence(by_name["cardiomegaly"], rng))
    elif rng.random() < 0.85:
        sentences.append(_pick(rng, NORMAL_HEART))

    for name in ("consolidation", "nodule", "atelectasis", "pleural_effusion", "pneumothorax"):
        if name in by_name:
            sentences.append(_POSITIVE_SENTENCES[name](by_name[name], rng))

    sentences.extend(_negations(by_name, rng))
    if rng.random() < 0.4:
        sentences.append(_pick(rng, BONES))
    return " ".join(sentences)


def _negations(by_name: dict, rng: np.random.Generator) -> list[str]:
    """Return sentences that clear or negate the lung and pleural findings that are absent."""
    sentences = []
    lung_findings = {"consolidation", "nodule", "atelectasis", "pleural_effusion", "pneumothorax"}
    if not lung_findings & set(by_name):
        sentences.append(_pick(rng, CLEAR_LUNGS))
    else:
        if "consolidation" not in by_name and rng.random() < 0.7:
            sentences.append(_pick(rng, NO_CONSOLIDATION))
        if "nodule" not in by_name and rng.random() < 0.2:
            sentences.append(_pick(rng, NO_NODULE))

    has_effusion, has_pneumothorax = "pleural_effusion" in by_name, "pneumothorax" in by_name
    if not has_effusion and not has_pneumothorax:
        if rng.random() < 0.9:
            sentences.append(_pick(rng, NO_EFFUSION_OR_PNEUMOTHORAX))
    elif not has_pneumothorax and rng.random() < 0.8:
        sentences.append(_pick(rng, NO_PNEUMOTHORAX))
    elif not has_effusion and rng.random() < 0.6:
        sentences.append(_pick(rng, NO_EFFUSION))
    return sentences


def _impression_section(findings: Sequence[Finding], rng: np.random.Generator) -> str:
    return " ".join(_IMPRESSIONS[f.name](f, rng) for f in findings)


# --- statements per finding -----------------------------------------------------------


def _cardiomegaly_sentence(finding: Finding, rng: np.random.Generator) -> str:
    adjective, adverb = _HEART_ADJECTIVE[finding.severity], _HEART_ADVERB[finding.severity]
    return _pick(rng, (
        f"The heart is {adverb} enlarged.",
        f"{_capitalise(adjective)} cardiomegaly.",
        f"The cardiac silhouette is {adverb} enlarged.",
        f"There is {adjective} cardiomegaly.",
    ))


def _cardiomegaly_impression(finding: Finding, rng: np.random.Generator) -> str:
    adjective = _HEART_ADJECTIVE[finding.severity]
    return _pick(rng, (f"{_capitalise(adjective)} cardiomegaly.", "Cardiomegaly.",
                       f"{_capitalise(adjective)} enlargement of the cardiac silhouette."))


def _effusion_sentence(finding: Finding, rng: np.random.Generator) -> str:
    size = _SIZE[finding.severity]
    if finding.laterality == "bilateral":
        return _pick(rng, (
            f"There are {size} bilateral pleural effusions.",
            f"{_capitalise(size)} bilateral pleural effusions.",
            f"{_capitalise(size)} pleural effusions are present on both sides.",
        ))
    side = finding.laterality
    article = "an" if size[0] in "aeiou" else "a"
    return _pick(rng, (
        f"There is {article} {size} {side} pleural effusion.",
        f"{_capitalise(size)} {side} pleural effusion with blunting of the costophrenic angle.",
        f"{_capitalise(article)} {size} {side} pleural effusion is present.",
        f"{_capitalise(size)} {side} pleural effusion layering at the {side} base.",
    ))


def _effusion_impression(finding: Finding, rng: np.random.Generator) -> str:
    size = _SIZE[finding.severity]
    if finding.laterality == "bilateral":
        return _pick(rng, (f"{_capitalise(size)} bilateral pleural effusions.", "Bilateral pleural effusions."))
    side = finding.laterality
    return _pick(rng, (f"{_capitalise(size)} {side} pleural effusion.", f"{_capitalise(side)} pleural effusion."))


def _pneumothorax_sentence(finding: Finding, rng: np.random.Generator) -> str:
    size, side = _SIZE[finding.severity], finding.laterality
    article = "an" if size[0] in "aeiou" else "a"
    return _pick(rng, (
        f"There is {article} {size} {side} pneumothorax.",
        f"{_capitalise(article)} {size} {side} apicolateral pneumothorax is seen, with a visible pleural edge.",
        f"{_capitalise(size)} {side} pneumothorax with a visible visceral pleural line.",
    ))


def _pneumothorax_impression(finding: Finding, rng: np.random.Generator) -> str:
    size, side = _SIZE[finding.severity], finding.laterality
    return _pick(rng, (f"{_capitalise(size)} {side} pneumothorax.", f"{_capitalise(side)} pneumothorax."))


def _consolidation_location(finding: Finding, rng: np.random.Generator) -> tuple[str, str]:
    """Return the location as (noun phrase, adjective phrase): by lobe or by zone."""
    if rng.random() < 0.5:
        return _LOBES[(finding.laterality, finding.zone)]
    zone = f"{finding.laterality} {_ZONE_WORD[finding.zone]} zone"
    return zone, zone


def _consolidation_sentence(finding: Finding, rng: np.random.Generator) -> str:
    adjective = _CONSOLIDATION_ADJECTIVE[finding.severity]
    noun, modifier = _consolidation_location(finding, rng)
    return _pick(rng, (
        f"{_capitalise(adjective)} consolidation in the {noun}.",
        f"There is {adjective} airspace consolidation in the {noun}.",
        f"{_capitalise(adjective)} {modifier} consolidation.",
        f"{_capitalise(adjective)} airspace opacity in the {noun}.",
    ))


def _consolidation_impression(finding: Finding, rng: np.random.Generator) -> str:
    adjective = _CONSOLIDATION_ADJECTIVE[finding.severity]
    noun, modifier = _consolidation_location(finding, rng)
    return _pick(rng, (
        f"{_capitalise(modifier)} consolidation.",
        f"{_capitalise(adjective)} {modifier} consolidation, compatible with pneumonia.",
        f"Consolidation in the {noun}, which may represent pneumonia.",
    ))


def _nodule_sentence(finding: Finding, rng: np.random.Generator) -> str:
    millimetres = nodule_diameter_mm(finding)
    zone = f"{finding.laterality} {_ZONE_WORD[finding.zone]} zone"
    small = "small " if finding.severity == "mild" else ""
    return _pick(rng, (
        f"There is a {millimetres} mm nodule in the {zone}.",
        f"A {small}rounded nodule projects over the {zone}.",
        f"A well-circumscribed {millimetres} mm nodular opacity in the {zone}.",
        f"{_capitalise(small)}{zone} pulmonary nodule measuring {millimetres} mm.",
    ))


def _nodule_impression(finding: Finding, rng: np.random.Generator) -> str:
    zone = f"{finding.laterality} {_ZONE_WORD[finding.zone]} zone"
    return _pick(rng, (
        f"{_capitalise(zone)} pulmonary nodule. CT is recommended for further characterization.",
        f"{nodule_diameter_mm(finding)} mm {zone} nodule.",
        f"Pulmonary nodule in the {zone}.",
    ))


def _atelectasis_sentence(finding: Finding, rng: np.random.Generator) -> str:
    adjective = _ATELECTASIS_ADJECTIVE[finding.severity]
    if finding.laterality == "bilateral":
        return _pick(rng, (
            f"{_capitalise(adjective)} bibasilar plate-like atelectasis.",
            f"{_capitalise(adjective)} plate-like atelectasis at both lung bases.",
            "Linear opacities at both lung bases, consistent with atelectasis.",
        ))
    side = finding.laterality
    return _pick(rng, (
        f"{_capitalise(adjective)} plate-like atelectasis at the {side} base.",
        f"{_capitalise(adjective)} {side} basilar atelectasis with slight elevation of the {side} hemidiaphragm.",
        f"Linear opacity at the {side} lung base, consistent with atelectasis.",
    ))


def _atelectasis_impression(finding: Finding, rng: np.random.Generator) -> str:
    if finding.laterality == "bilateral":
        return _pick(rng, ("Bibasilar atelectasis.", "Atelectasis at both lung bases."))
    return _pick(rng, (f"{_capitalise(finding.laterality)} basilar atelectasis.",
                       f"Atelectasis at the {finding.laterality} base."))


def _device_sentence(finding: Finding, rng: np.random.Generator) -> str:
    side = _DEVICE_SIDE_WORD.get(finding.laterality, "")
    if finding.device == "endotracheal_tube":
        centimetres = tube_tip_cm(finding)
        return _pick(rng, (f"An endotracheal tube terminates {centimetres} cm above the carina.",
                           f"Endotracheal tube tip is {centimetres} cm above the carina."))
    if finding.device == "enteric_tube":
        return _pick(rng, ("An enteric tube courses below the diaphragm with its tip in the stomach.",
                           "Nasogastric tube with the tip in the stomach."))
    if finding.device == "jugular_catheter":
        return _pick(rng, (f"{_capitalise(side)} internal jugular central venous catheter with the tip in the "
                           "superior vena cava.",
                           f"A {side} internal jugular central line terminates in the SVC."))
    if finding.device == "subclavian_catheter":
        return _pick(rng, (f"{_capitalise(side)} subclavian central venous catheter with the tip in the "
                           "superior vena cava.",
                           f"A {side} subclavian central line terminates in the SVC."))
    return _pick(rng, (f"{_capitalise(side)} chest wall pacemaker with leads in the right atrium and right ventricle.",
                       f"A {side}-sided dual-lead pacemaker is in place."))


def _device_impression(finding: Finding, rng: np.random.Generator) -> str:
    side = _DEVICE_SIDE_WORD.get(finding.laterality, "")
    return {
        "endotracheal_tube": "Endotracheal tube in satisfactory position.",
        "enteric_tube": "Enteric tube in the stomach.",
        "jugular_catheter": f"{_capitalise(side)} internal jugular catheter in satisfactory position.",
        "subclavian_catheter": f"{_capitalise(side)} subclavian catheter in satisfactory position.",
        "pacemaker": f"{_capitalise(side)} chest wall pacemaker in place.",
    }[finding.device]


_POSITIVE_SENTENCES = {
    "consolidation": _consolidation_sentence,
    "nodule": _nodule_sentence,
    "atelectasis": _atelectasis_sentence,
    "pleural_effusion": _effusion_sentence,
    "pneumothorax": _pneumothorax_sentence,
}
_IMPRESSIONS = {
    "cardiomegaly": _cardiomegaly_impression,
    "pleural_effusion": _effusion_impression,
    "pneumothorax": _pneumothorax_impression,
    "consolidation": _consolidation_impression,
    "nodule": _nodule_impression,
    "atelectasis": _atelectasis_impression,
    "support_device": _device_impression,
}
