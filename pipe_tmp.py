import time, numpy as np, os
from jaxdiff.pipeline import Pipeline
t0=time.time()
pipe=Pipeline.from_pretrained("tests/fixtures/sd_tiny_sd2pipe")
ref=np.load("tests/fixtures/sd_tiny_sd2pipe/reference.npz"); k=np.load("tests/fixtures/sd_ksched/pipeline.npz")
PROMPTS = ["a photo of a red bicycle, high detail", "two cats on a sofa!"]
NEGATIVE = ["blurry", "low quality, watermark"]
t1=time.time()
x=pipe.sample(PROMPTS, NEGATIVE, gamma=7.5, sampler="euler_discrete_karras", steps=8, latents=ref["latents"], height=32, width=32)
im=np.clip((np.asarray(x)+1)/2,0,1)
print("err", np.abs(im-k["euler_discrete_karras/images"]).max(), "load", t1-t0, "sample", time.time()-t1)
o=pipe.sampler_options("euler_discrete_karras", 8)
print(np.array(o["walk"].t)-1, k["euler_discrete_karras/timesteps"]); print(np.array(o["walk"].sigmas)-k["euler_discrete_karras/sigmas"])
