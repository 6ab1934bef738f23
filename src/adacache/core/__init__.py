"""The caching algorithm, with no model in sight: three parts, each pure logic tested on plain sequences.

- `decision`: when to compute. Per generation, `Schedule` turns each computed step's probe into sums (L1 of the
  change, L1 of the base, MoReg's numerator and denominator), takes their ratios at the decision, and looks the rate
  up in the codebook.
- `store`: what a skipped step adds. A `ResidualStore` keeps what computed steps measured and produces the
  residual for a skipped one: plain reuse (the paper's) or a forecast.
- `clock`: which generation, branch and step a transformer call is, from what the call can tell (diffusers'
  cache context, the scheduler's timesteps, the timestep itself).

`adacache.hooks` only moves tensors between a model's blocks and these three.
"""
