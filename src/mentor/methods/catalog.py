"""The one explicit list of built-in methods: name -> the module that registers it.

``config`` and the command line look a method up here and import only its module, so naming a
distillation method never imports the diffusion family, and ``mentor --help`` imports none. A test
checks that every module listed registers exactly the names listed for it.
"""

from __future__ import annotations

BUILTIN: dict[str, str] = {
    "supervised": "mentor.methods.supervised",
    # knowledge distillation
    "kd": "mentor.distill.kd",
    "dkd": "mentor.distill.dkd",
    "rld": "mentor.distill.rld",
    "fitnet": "mentor.distill.fitnet",
    "at": "mentor.distill.at",
    "rkd": "mentor.distill.rkd",
    "crd": "mentor.distill.crd",
    "simkd": "mentor.distill.simkd",
    "semckd": "mentor.distill.semckd",
    "mmkd": "mentor.distill.mmkd",
    "dskd": "mentor.distill.dskd",
    "avg_mkd": "mentor.distill.multi_teacher",
    "ebkd": "mentor.distill.multi_teacher",
    "camkd": "mentor.distill.multi_teacher",
    "dml": "mentor.distill.online",
    "okddip": "mentor.distill.online",
    "mbd": "mentor.distill.online",
    # semi-supervised learning
    "pseudo_label": "mentor.semi.pseudo_label",
    "fixmatch": "mentor.semi.fixmatch",
    "flexmatch": "mentor.semi.flexmatch",
    "freematch": "mentor.semi.freematch",
    "softmatch": "mentor.semi.softmatch",
    "dash": "mentor.semi.dash",
    "uda": "mentor.semi.uda",
    "adamatch": "mentor.semi.adamatch",
    "defixmatch": "mentor.semi.defixmatch",
    "pi_model": "mentor.semi.pi_model",
    "mean_teacher": "mentor.semi.mean_teacher",
    "vat": "mentor.semi.vat",
    "mixmatch": "mentor.semi.mixmatch",
    "remixmatch": "mentor.semi.remixmatch",
    "simmatch": "mentor.semi.simmatch",
    "comatch": "mentor.semi.comatch",
    "unimatch": "mentor.semi.unimatch",
    "shrinkmatch": "mentor.semi.shrinkmatch",
    "mutexmatch": "mentor.semi.mutexmatch",
    "rda": "mentor.semi.rda",
    "soc": "mentor.semi.soc",
    "rkd_unlabeled": "mentor.semi.rkd_unlabeled",
    # domain generalisation
    "erm": "mentor.generalize.erm",
    # test-time adaptation
    "source": "mentor.adapt.tta",
    "norm": "mentor.adapt.tta",
    "bn_ema": "mentor.adapt.tent",
    "tent": "mentor.adapt.tent",
    "eta": "mentor.adapt.eata",
    "eata": "mentor.adapt.eata",
    "sar": "mentor.adapt.sar",
    "deyo": "mentor.adapt.deyo",
    "cotta": "mentor.adapt.cotta",
    "memo": "mentor.adapt.memo",
    "lame": "mentor.adapt.lame",
    "rotta": "mentor.adapt.rotta",
    "t3a": "mentor.adapt.t3a",
    "domain_adaptor": "mentor.adapt.domain_adaptor",
    # source-free domain adaptation
    "shot": "mentor.adapt.shot",
    "shot_im": "mentor.adapt.shot",
    "nrc": "mentor.adapt.nrc",
    "aad": "mentor.adapt.aad",
    "arfnet": "mentor.adapt.arfnet",
    "cadtrans": "mentor.adapt.cadtrans",
    # diffusion
    "edm": "mentor.diffusion.edm",
}
