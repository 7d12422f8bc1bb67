[Variant("paper (reg 1e-4)"),
 Variant("reg 1e-3", train={"meta.lambda_p": 1e-3, "meta.lambda_q_pos": 1e-3, "meta.lambda_q_neg": 1e-3}),
 Variant("reg 1e-2", train={"meta.lambda_p": 1e-2, "meta.lambda_q_pos": 1e-2, "meta.lambda_q_neg": 1e-2}),
 Variant("reg 1e-2 serve L=5", train={"meta.lambda_p": 1e-2, "meta.lambda_q_pos": 1e-2, "meta.lambda_q_neg": 1e-2}, serve={"meta.inner_steps": 5}),
]
