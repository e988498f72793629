#include "engine/engine_core.h"

#include <algorithm>
#include <chrono>
#include <cassert>
#include <cstdio>
#include <cstring>
#include <stdexcept>

namespace pyserve {

namespace {
int pages_for(int64_t tokens, int page_size) { return static_cast<int>((tokens + page_size - 1) / page_size); }
int at_least_one(int v) { return std::max(v, 1); }
}  // namespace

EngineCore::EngineCore(std::shared_ptr<LlamaModel> model, EngineConfig config)
    : model_(std::move(model)),
      config_(std::move(config)),
      cache_(model_->backend(), model_->config().num_layers,
             pages_for(at_least_one(config_.kv_capacity_tokens), at_least_one(config_.page_size)),
             at_least_one(config_.page_size), model_->config().kv_dim()),
      pool_(cache_.num_pages()),
      prefix_cache_(config_.prefix_cache
                        ? std::make_unique<PrefixCache>(pool_, at_least_one(config_.page_size),
                                                        config_.prefix_cache_max_recycling == -2
                                                            ? config_.max_num_seqs
                                                            : config_.prefix_cache_max_recycling)
                        : nullptr),
      scheduler_({config_.max_num_seqs, config_.max_batch_tokens, config_.page_size, config_.chunked_prefill,
                  model_->config().release_window(),
                  model_->config().release_window() > 0 ? model_->config().attention_sink : 0},
                 pool_, prefix_cache_.get()) {
  if (config_.page_size < 1) throw std::invalid_argument("page_size must be >= 1");
  if (config_.speculative_mode == SpeculativeMode::small_draft || config_.speculative_mode == SpeculativeMode::eagle) {
    const bool eagle = config_.speculative_mode == SpeculativeMode::eagle;
    if (!config_.draft_model) throw std::invalid_argument(eagle ? "speculative_mode eagle needs the EAGLE draft layer"
                                                                 : "speculative_mode small_draft needs a draft model");
    if (eagle && !config_.eagle) throw std::invalid_argument("speculative_mode eagle needs the draft's input fc");
    if (eagle && (config_.eagle->target != model_ || config_.draft_model == model_))
      throw std::invalid_argument("eagle: the draft's input must read this engine's model, and the draft be another one");
    if (!eagle && !config_.draft_vocab.empty())
      throw std::invalid_argument("a draft vocabulary is for eagle drafts only (a small_draft has the target's)");
    const int vocab = config_.draft_vocab.empty() ? config_.draft_model->config().vocab_size : model_->config().vocab_size;
    if (vocab != model_->config().vocab_size)
      throw std::invalid_argument("the draft model's vocabulary (" + std::to_string(config_.draft_model->config().vocab_size) +
                                  " tokens) is not the target's (" + std::to_string(model_->config().vocab_size) + ")");
    for (int32_t t : config_.draft_vocab)
      if (t < 0 || t >= model_->config().vocab_size) throw std::invalid_argument("the draft vocabulary holds a token outside the target's");
    draft_ = std::make_unique<DraftModel>(config_.draft_model, config_.kv_capacity_tokens, config_.page_size,
                                          config_.max_batch_tokens, eagle ? config_.eagle : nullptr, config_.draft_vocab);
  }
  if (config_.speculative_mode == SpeculativeMode::medusa) {
    if (!config_.medusa) throw std::invalid_argument("speculative_mode medusa needs Medusa heads");
    medusa_ = config_.medusa;
  }
  if (config_.max_model_len < 2) throw std::invalid_argument("max_model_len must be >= 2");
  if (config_.spec_tree_width > 1 && model_->config().attention_sink > 0)
    throw std::invalid_argument("draft trees (spec_tree_width > 1) do not work with an attention sink yet");
  config_.prompt_logit_rows = at_least_one(config_.prompt_logit_rows);
  // Everything a step needs is sized here, from the configured limits: serving allocates no
  // buffer that grows with the largest request ever seen.
  const int step_tokens = scheduler_.config().max_batch_tokens;
  const size_t H = static_cast<size_t>(model_->config().hidden_size);
  const size_t V = static_cast<size_t>(model_->config().vocab_size);
  const size_t seqs = static_cast<size_t>(config_.max_num_seqs);
  model_->reserve(step_tokens);
  batch_.tokens.reserve(step_tokens);
  batch_.positions.reserve(step_tokens);
  batch_.page_tables.reserve(step_tokens);
  batch_.logit_rows.reserve(step_tokens);
  // A decode samples one row, and one more per draft (and tree leaf) it verifies.
  const size_t rows_per_seq = 1 + static_cast<size_t>(max_draft_length()) * std::max(config_.spec_tree_width, 1);
  sample_hidden_.reserve(seqs * rows_per_seq * H);
  sample_logits_.reserve(seqs * rows_per_seq * V);
  counters_.spec_accepted_by_position.assign(static_cast<size_t>(max_draft_length()), 0);
  // Drafts come in runs: later ones start out likelier than not (2/3), until measured.
  spec_later_.assign(static_cast<size_t>(std::max(max_draft_length() - 1, 0)), AcceptanceEstimate{3, 1});
  prompt_logits_.reserve(static_cast<size_t>(config_.prompt_logit_rows) * V);
  counters_.kv_pages_total = pool_.num_pages();
  counters_.page_size = config_.page_size;
  counters_.kv_capacity_tokens = cache_.capacity_tokens();
}

int64_t EngineCore::context_limit() const {
  // A model that slides in every layer holds only its window (and sink): longer sequences fit.
  if (model_->config().release_window() > 0) return config_.max_model_len;
  return std::min<int64_t>(config_.max_model_len, cache_.capacity_tokens());
}

// ---- intake ------------------------------------------------------------------------------------

void EngineCore::check_request(int64_t id, const std::vector<int32_t>& prompt, const SamplingParams& params) const {
  const int vocab = model_->config().vocab_size;
  params.validate(vocab);
  if (id < 0 || id >= (int64_t{1} << 54)) throw std::invalid_argument("request id out of range");
  if (prompt.empty()) throw std::invalid_argument("the prompt has no tokens");
  for (int32_t t : prompt)
    if (t < 0 || t >= vocab)
      throw std::invalid_argument("token id " + std::to_string(t) + " is outside the vocabulary [0, " +
                                  std::to_string(vocab) + ")");
  if (params.grammar && params.grammar->vocabulary().vocab_size() != vocab)
    throw std::invalid_argument("the grammar was compiled for another vocabulary");
  const int64_t limit = context_limit();
  if (static_cast<int64_t>(prompt.size()) >= limit)
    throw std::invalid_argument("the prompt has " + std::to_string(prompt.size()) +
                                " tokens, but the context holds " + std::to_string(limit) +
                                " (prompt and output together)");
}

void EngineCore::add_request(int64_t id, std::vector<int32_t> prompt, SamplingParams params) {
  check_request(id, prompt, params);
  faults_.check(Phase::intake, step_index_, id);
  auto live = open_choices_.lower_bound(request_key(id, 0));
  if (live != open_choices_.end() && *live < request_key(id + 1, 0))
    throw std::invalid_argument("request id " + std::to_string(id) + " is already live");
  const int vocab = model_->config().vocab_size;
  auto r = std::make_unique<Request>();
  r->id = id;
  r->seq.id = request_key(id, 0);
  r->seq.num_tokens = static_cast<int>(prompt.size());
  r->num_prompt = r->seq.num_tokens;
  r->tokens = std::move(prompt);
  r->params = std::move(params);
  r->prompt_logprobs_done = r->params.prompt_logprobs < 0;
  r->seq.tokens = &r->tokens;
  r->seq.share_prefix = r->prompt_logprobs_done;  // prompt logprobs need every prompt row computed
  if (r->params.pin_prompt) r->seq.pin_tokens = r->num_prompt;
  if (r->params.penalised()) {
    r->history = std::make_unique<TokenHistory>();
    r->history->add_prompt(r->tokens, vocab);
  }
  if (r->params.grammar) r->grammar = r->params.grammar->start();
  seed_rng(*r);
  Request* raw = r.get();
  const int n = std::max(r->params.n, 1);
  // All or nothing: a request that cannot be registered whole leaves no trace.
  try {
    requests_[raw->seq.id] = std::move(r);
    for (int i = 0; i < n; ++i) open_choices_.insert(request_key(id, i));
    scheduler_.add(&raw->seq);
  } catch (...) {
    scheduler_.remove(&raw->seq);
    for (int i = 0; i < n; ++i) open_choices_.erase(request_key(id, i));
    requests_.erase(request_key(id, 0));
    throw;
  }
}

void EngineCore::seed_rng(Request& r) {
  if (r.params.has_seed)
    r.rng.seed(r.params.seed + static_cast<uint64_t>(r.index));
  else
    r.rng.seed((static_cast<uint64_t>(seed_source_()) << 32) ^ seed_source_());
}

// ---- endings -----------------------------------------------------------------------------------

EngineOutput& EngineCore::emit(const Request& r) {
  EngineOutput o;
  o.id = r.id;
  o.index = r.index;
  o.num_prompt_tokens = r.num_prompt;
  o.num_cached_tokens = std::max(r.seq.num_cached_tokens, 0);
  outputs_.push_back(std::move(o));
  return outputs_.back();
}

void EngineCore::end_choice(int64_t id, int index, int num_prompt, const char* reason, const std::string& message,
                            EngineOutput* carrier) {
  auto it = open_choices_.find(request_key(id, index));
  if (it == open_choices_.end()) {
    // A second end for one choice is an engine bug: a consumer would see its stream end twice.
    assert(false && "a request choice was ended twice");
    std::fprintf(stderr, "pyserve engine: request %lld choice %d ended twice (%s); dropped\n",
                 static_cast<long long>(id), index, reason);
    return;
  }
  if (carrier == nullptr) {
    EngineOutput o;
    o.id = id;
    o.index = index;
    o.num_prompt_tokens = num_prompt;
    outputs_.push_back(std::move(o));
    carrier = &outputs_.back();
  }
  carrier->finished = true;
  carrier->finish_reason = reason;
  carrier->error = message;
  open_choices_.erase(it);
  if (std::strcmp(reason, "error") == 0) ++counters_.requests_failed;
}

void EngineCore::reject(int64_t id, int n, int num_prompt, const std::string& message) {
  auto live = open_choices_.lower_bound(request_key(id, 0));
  if (live != open_choices_.end() && *live < request_key(id + 1, 0)) {
    std::fprintf(stderr, "pyserve engine: request id %lld is already live; the newcomer is refused\n",
                 static_cast<long long>(id));
    return;
  }
  if (!message.empty())
    std::fprintf(stderr, "pyserve engine: request %lld not taken in: %s\n", static_cast<long long>(id), message.c_str());
  for (int i = 0; i < n; ++i) {
    open_choices_.insert(request_key(id, i));
    end_choice(id, i, num_prompt, message.empty() ? "abort" : "error", message);
  }
}

void EngineCore::emit_replacement_end(int64_t id, int index, const std::string& message) {
  if (open_choices_.count(request_key(id, index))) {
    fail(id, index, message);
    return;
  }
  // Its end was already made, and lost on the way out: make it again, as an error.
  EngineOutput o;
  o.id = id;
  o.index = index;
  o.finished = true;
  o.finish_reason = "error";
  o.error = message;
  outputs_.push_back(std::move(o));
  ++counters_.requests_failed;
}

void EngineCore::release(Request& r) {
  const int64_t k = r.seq.id;
  if (draft_) draft_->release(k);
  try {
    scheduler_.remove(&r.seq);
  } catch (...) {
    requests_.erase(k);  // forget it anyway; the broken bookkeeping surfaces in the next plan
    throw;
  }
  requests_.erase(k);  // r is gone after this line
}

void EngineCore::finish(Request& r, const char* reason, const std::string& message) {
  // Choice 0 of an n > 1 request that has not forked yet stands for all of its choices: end every
  // one still open, or a consumer waiting for n ends would wait forever.
  const int n = r.choices_represented();
  for (int i = 0; i < n; ++i) {
    const int index = n > 1 ? i : r.index;
    if (index != r.index && !open_choices_.count(request_key(r.id, index))) continue;
    end_choice(r.id, index, r.num_prompt, reason, message);
  }
  release(r);
}

void EngineCore::fail_request(Request& r, const std::string& message) {
  std::fprintf(stderr, "pyserve engine: request %lld failed: %s\n", static_cast<long long>(r.id), message.c_str());
  const int n = r.choices_represented();
  for (int i = 0; i < n; ++i) {
    const int index = n > 1 ? i : r.index;
    if (open_choices_.count(request_key(r.id, index))) end_choice(r.id, index, r.num_prompt, "error", message);
  }
  release(r);
}

void EngineCore::abort(int64_t id, int index) {
  for (auto it = requests_.lower_bound(request_key(id, 0)); it != requests_.end() && it->second->id == id;) {
    Request& r = *it->second;
    ++it;  // finish() erases r
    if (index < 0 || r.index == index) {
      finish(r, "abort");
    } else if (r.index == 0 && !r.forked && index < r.params.n && open_choices_.count(request_key(id, index))) {
      // A choice that does not exist yet: end it now; the fork will skip it.
      end_choice(id, index, r.num_prompt, "abort", {});
    }
  }
}

void EngineCore::fail(int64_t id, int index, const std::string& message) {
  for (auto it = requests_.lower_bound(request_key(id, 0)); it != requests_.end() && it->second->id == id;) {
    Request& r = *it->second;
    ++it;
    if (index < 0 || r.index == index) {
      fail_request(r, message);
    } else if (r.index == 0 && !r.forked && index < r.params.n && open_choices_.count(request_key(id, index))) {
      end_choice(id, index, r.num_prompt, "error", message);
    }
  }
}

void EngineCore::end_all(const char* reason, const std::string& message) {
  bool bookkeeping_broken = false;
  while (!requests_.empty()) {
    Request& r = *requests_.begin()->second;
    try {
      finish(r, reason, message);
    } catch (const std::exception&) {
      bookkeeping_broken = true;  // finish() ended its choices and forgot it before rethrowing
    }
  }
  // Ends for choices without a request object (none in a consistent state; belt and braces).
  const std::vector<int64_t> left(open_choices_.begin(), open_choices_.end());
  for (int64_t k : left) end_choice(k / 256, static_cast<int>(k % 256), 0, reason, message);
  if (bookkeeping_broken) {
    scheduler_.reset();
    if (prefix_cache_) prefix_cache_->reset(false);
    pool_.reset();
  }
}

void EngineCore::recover_from_plan_failure(const std::string& message) {
  std::fprintf(stderr, "pyserve engine: %s; ending every request and resetting the cache bookkeeping\n",
               message.c_str());
  ++counters_.step_failures;
  const std::vector<int64_t> left(open_choices_.begin(), open_choices_.end());
  for (int64_t k : left) {
    const int64_t id = k / 256;
    auto owner = requests_.find(request_key(id, 0));
    const int num_prompt = owner == requests_.end() ? 0 : owner->second->num_prompt;
    end_choice(id, static_cast<int>(k % 256), num_prompt, "error", message);
  }
  requests_.clear();
  if (draft_) draft_->reset();
  scheduler_.reset();
  if (prefix_cache_) prefix_cache_->reset(false);
  pool_.reset();
}

std::vector<EngineOutput> EngineCore::take_outputs() {
  std::vector<EngineOutput> out;
  out.swap(outputs_);
  return out;
}

// ---- the step ----------------------------------------------------------------------------------

bool EngineCore::step() {
  last_step_.clear();
  if (requests_.empty()) return false;
  ++step_index_;
  std::vector<ScheduledChunk> chunks;
  const int64_t failed_before = counters_.requests_failed;
  try {
    propose();  // a fault while proposing drafts is a fault in planning
    chunks = plan();
  } catch (const std::exception& e) {
    recover_from_plan_failure(std::string("engine fault while planning a step: ") + e.what());
    return true;
  }
  if (chunks.empty()) return counters_.requests_failed != failed_before || rejected_last_plan_ > 0;

  {
    // run and accept read the model's workspace (the hidden states): hold it across both.
    auto model_lock = model_->lock();
    build(chunks);
    if (rows_.empty()) return true;  // every request of the step failed in build
    try {
      run();
    } catch (const std::exception& e) {
      const std::string message = std::string("engine fault while running the model: ") + e.what();
      ++counters_.step_failures;
      for (const RowUse& u : rows_) fail_request(*u.req, message);
      rows_.clear();
      return true;
    }
    accept();
  }
  commit();
  counters_.steps += 1;
  return true;
}

// ---- speculation -------------------------------------------------------------------------------

int EngineCore::max_draft_length() const {
  if (config_.speculative_mode == SpeculativeMode::disable) return 0;
  const int most = config_.spec_draft_length > 0 ? config_.spec_draft_length : 4;
  return medusa_ ? std::min(most, medusa_->num_heads()) : most;  // one draft per head
}

int EngineCore::draft_length() const {
  if (config_.speculative_mode == SpeculativeMode::disable || config_.spec_draft_length > 0) return max_draft_length();
  // MLC's automatic length: fewer drafts as the batch grows (a big batch is compute-bound, and
  // every rejected draft is compute thrown away).
  const size_t running = scheduler_.running().size();
  return std::min(max_draft_length(), running < 10 ? 4 : running < 20 ? 3 : running < 30 ? 2 : 0);
}

void EngineCore::propose() {
  if (config_.speculative_mode == SpeculativeMode::disable) return;
  const int k = draft_length();
  const int64_t limit = context_limit();
  // Automatic length: MLC's rule is the most a sequence may verify; the step's cost decides how
  // many it does (draft_policy.h). Prompt-lookup drafts cost nothing to make, so they are weighed
  // once proposed; a draft model's are weighed before they are made, each one also paying for the
  // draft model's step.
  const bool weigh = config_.spec_draft_length == 0 && config_.spec_token_cost > 0;
  std::vector<DraftCandidate> candidates;
  std::vector<Request*> weighed;
  for (Sequence* s : scheduler_.running()) {
    s->drafts.clear();
    s->leaves.clear();
    auto it = requests_.find(s->id);
    if (it == requests_.end() || s->num_tokens - s->num_computed != 1) continue;  // only decodes speculate
    Request& r = *it->second;
    // No draft past max_tokens or the context: it could never be kept.
    int room = static_cast<int>(std::min<int64_t>(k, limit - s->num_tokens - 1));
    if (r.params.max_tokens >= 0) room = std::min(room, r.params.max_tokens - r.num_generated - 1);
    if (room <= 0) continue;
    // Medusa reads the hidden state that drew the latest token: none yet for a fork's child.
    if (medusa_ && (r.spec_features.empty() || r.spec_features.end() != s->num_tokens - 1)) continue;
    int offered = room;  // a draft model or the heads offer what they are asked for
    if (!draft_ && !medusa_) {
      ngram_propose(r.tokens.data(), static_cast<int>(r.tokens.size()), room, config_.ngram, s->drafts);
      settle_drafts(r);
      offered = static_cast<int>(s->drafts.size());
    }
    // Explore a sequence whose first drafts were never tested, or not for 16 of its steps (64 where
    // drafts cost something to make: a draft model catches up on every token since its last).
    const int explore_every = draft_ || medusa_ ? 64 : 16;
    const bool explore = r.spec_acceptance.kept + r.spec_acceptance.rejected == 0 || ++r.spec_untested >= explore_every;
    candidates.push_back({offered, r.spec_acceptance.value(), explore});
    weighed.push_back(&r);
  }
  std::vector<int> keep;
  for (const DraftCandidate& c : candidates) keep.push_back(c.proposed);
  if (weigh && !candidates.empty()) {
    std::vector<double> later;
    for (const AcceptanceEstimate& e : spec_later_) later.push_back(e.value());
    // A tree verifies width tokens per draft position.
    keep = choose_draft_lengths(candidates, later,
                                config_.spec_token_cost * std::max(config_.spec_tree_width, 1) +
                                    (draft_ || medusa_ ? config_.spec_draft_cost : 0));
  }
  if (!draft_ && !medusa_) {
    for (size_t i = 0; i < weighed.size(); ++i) weighed[i]->seq.drafts.resize(static_cast<size_t>(keep[i]));
    return;
  }
  if (medusa_) {
    propose_medusa(weighed, keep);
    return;
  }
  std::vector<DraftModel::Want> wants;  // proposed together, batched
  std::vector<Request*> wanting;
  for (size_t i = 0; i < weighed.size(); ++i) {
    if (keep[i] <= 0) continue;
    const FeatureStore& f = weighed[i]->spec_features;
    wants.push_back({weighed[i]->seq.id, &weighed[i]->tokens, keep[i], &weighed[i]->seq.drafts,
                     f.empty() ? nullptr : f.data(), f.from(), f.count(),
                     config_.spec_tree_width > 1 ? &weighed[i]->seq.leaves : nullptr, config_.spec_tree_width});
    wanting.push_back(weighed[i]);
  }
  if (wants.empty()) return;
  draft_->propose(wants);
  if (draft_->eagle())  // what the draft consumed: it re-reads from the feature before its last position
    for (Request* r : wanting) r->spec_features.drop_before(draft_->computed(r->seq.id) - 1);
  for (Request* r : wanting) settle_drafts(*r);
}

void EngineCore::propose_medusa(const std::vector<Request*>& weighed, const std::vector<int>& keep) {
  // The heads run once over every sequence that drafts, as many heads as the longest wants.
  const size_t H = static_cast<size_t>(model_->config().hidden_size);
  std::vector<std::vector<int32_t>*> outs;
  std::vector<std::vector<DraftLeaf>*> leaves;
  std::vector<Request*> drafting;
  int most = 0;
  medusa_hidden_.clear();
  for (size_t i = 0; i < weighed.size(); ++i) {
    if (keep[i] <= 0) continue;
    Request& r = *weighed[i];
    medusa_hidden_.insert(medusa_hidden_.end(), r.spec_features.latest(), r.spec_features.latest() + H);
    outs.push_back(&r.seq.drafts);
    leaves.push_back(&r.seq.leaves);
    drafting.push_back(&r);
    most = std::max(most, keep[i]);
  }
  if (drafting.empty()) return;
  if (medusa_hidden_.size() != drafting.size() * H) throw std::logic_error("medusa: a hidden state of the wrong size");
  {
    auto model_lock = model_->lock();  // the heads compute on the target's backend (and LM head)
    medusa_->propose(medusa_hidden_.data(), static_cast<int>(drafting.size()), most, outs.data(),
                     config_.spec_tree_width > 1 ? leaves.data() : nullptr, config_.spec_tree_width);
  }
  for (size_t i = 0, d = 0; i < weighed.size(); ++i) {
    if (keep[i] <= 0) continue;
    Request& r = *drafting[d++];
    if (r.seq.drafts.size() > static_cast<size_t>(keep[i])) r.seq.drafts.resize(static_cast<size_t>(keep[i]));
    settle_drafts(r);
  }
}

void EngineCore::settle_drafts(Request& r) {
  Sequence& s = r.seq;
  if (r.grammar && !s.drafts.empty())  // a draft the grammar refuses could never be kept
    s.drafts.resize(static_cast<size_t>(r.grammar->valid_prefix(s.drafts.data(), static_cast<int>(s.drafts.size()))));
  // A leaf stands in for a draft that is verified: past the drafts kept, it has no parent.
  const int drafts = static_cast<int>(s.drafts.size());
  s.leaves.erase(std::remove_if(s.leaves.begin(), s.leaves.end(), [&](const DraftLeaf& l) { return l.depth >= drafts; }),
                 s.leaves.end());
  std::stable_sort(s.leaves.begin(), s.leaves.end(), [](const DraftLeaf& a, const DraftLeaf& b) { return a.depth < b.depth; });
}

std::vector<ScheduledChunk> EngineCore::plan() {
  faults_.check(Phase::plan, step_index_);
  std::vector<ScheduledChunk> chunks = scheduler_.schedule();
  // Prefix-cache hits on part of a page: the new sequence's own copy of it, before anyone writes.
  for (const PageCopy& c : scheduler_.pending_copies()) cache_.copy_page(c.source.page, c.dst);
  scheduler_.copies_done();
  const std::vector<Sequence*> rejected = scheduler_.take_rejected();
  rejected_last_plan_ = static_cast<int>(rejected.size());
  for (Sequence* s : rejected) finish(*requests_.at(s->id), "length");
  return chunks;
}

void EngineCore::reset_cache() {
  if (!requests_.empty()) throw std::logic_error("reset_cache: requests are live");
  if (prefix_cache_) prefix_cache_->reset(true);
}

void EngineCore::build(const std::vector<ScheduledChunk>& chunks) {
  batch_.clear();
  rows_.clear();
  sample_rows_.clear();
  int64_t prompt_tokens = 0;
  for (const ScheduledChunk& c : chunks) {
    Request& r = *requests_.at(c.seq->id);
    const size_t base = batch_.tokens.size(), logit_base = batch_.logit_rows.size(), sample_base = sample_rows_.size();
    try {
      faults_.check(Phase::build, step_index_, r.id);
      const int drafts = c.drafts();
      if (drafts > static_cast<int>(r.seq.drafts.size())) throw std::logic_error("more drafts planned than proposed");
      RowUse u{&r, static_cast<int>(base), c.count, c.start, c.sample, drafts, c.leaves, -1, -1, 0, -1, 0};
      const bool tree = config_.spec_tree_width > 1;
      for (int i = 0; i < c.count; ++i) {
        const int t = c.start + i;  // the known tokens, then the drafts
        batch_.tokens.push_back(t < r.seq.num_tokens ? r.tokens[t] : r.seq.drafts[t - r.seq.num_tokens]);
        batch_.positions.push_back(c.start + i);
        batch_.page_tables.push_back(r.seq.pages.data());
        if (tree) batch_.kv_positions.push_back(c.start + i);
      }
      // Tree leaves: at their depth, their K/V in the slots after the drafts'.
      if (c.leaves > static_cast<int>(r.seq.leaves.size()) || (c.leaves > 0 && !tree))
        throw std::logic_error("more tree leaves planned than proposed");
      for (int l = 0; l < c.leaves; ++l) {
        batch_.tokens.push_back(r.seq.leaves[l].token);
        batch_.positions.push_back(c.start + c.count - drafts + r.seq.leaves[l].depth);
        batch_.page_tables.push_back(r.seq.pages.data());
        batch_.kv_positions.push_back(c.start + c.count + l);
      }
      // Logit rows: each prompt position whose next token is scored (prompt logprobs, in slices
      // through the LM head in accept), then the last position if this chunk samples.
      const int scored = r.prompt_logprobs_done ? 0 : std::min(c.count, r.num_prompt - 1 - c.start);
      if (scored > 0) {
        u.prompt_row = static_cast<int>(batch_.logit_rows.size());
        u.prompt_rows = scored;
        for (int i = 0; i < scored; ++i) batch_.logit_rows.push_back(static_cast<int32_t>(base) + i);
      }
      // eagle: a prompt chunk's rows (those that do not sample) are its draft's features.
      // (Prompt-logprob rows are those same rows when there are any: they serve as features too.)
      const int plain_rows = c.count - (c.sample ? 1 + drafts : 0);
      if (draft_ && draft_->eagle() && plain_rows > 0) {
        if (u.prompt_rows == plain_rows) {
          u.feature_row = u.prompt_row;
        } else {
          u.feature_row = static_cast<int>(batch_.logit_rows.size());
          for (int i = 0; i < plain_rows; ++i) batch_.logit_rows.push_back(static_cast<int32_t>(base) + i);
        }
        u.feature_rows = plain_rows;
      }
      if (c.sample) {  // the last known token's row, then each draft's
        u.sample_row = static_cast<int>(sample_rows_.size());
        for (int j = 0; j <= drafts; ++j) {
          sample_rows_.push_back(static_cast<int32_t>(batch_.logit_rows.size()));
          batch_.logit_rows.push_back(static_cast<int32_t>(base) + c.count - 1 - drafts + j);
        }
        for (int l = 0; l < c.leaves; ++l) {  // each leaf's, after
          sample_rows_.push_back(static_cast<int32_t>(batch_.logit_rows.size()));
          batch_.logit_rows.push_back(static_cast<int32_t>(base) + c.count + l);
        }
      }
      rows_.push_back(u);
      const bool prefill = r.seq.num_tokens - c.start > 1 || c.start < r.num_prompt;
      if (prefill) prompt_tokens += c.count;
      last_step_.push_back({r.id, r.index, c.start, c.count, std::max(r.seq.num_cached_tokens, 0), prefill});
    } catch (const std::exception& e) {
      batch_.tokens.resize(base);
      batch_.positions.resize(base);
      batch_.page_tables.resize(base);
      if (!batch_.kv_positions.empty()) batch_.kv_positions.resize(base);
      batch_.logit_rows.resize(logit_base);
      sample_rows_.resize(sample_base);
      ++counters_.step_failures;
      fail_request(r, std::string("engine fault while building the batch: ") + e.what());
    }
  }
  counters_.prompt_tokens_computed += prompt_tokens;
}

void EngineCore::run() {
  faults_.check(Phase::run, step_index_);
  hidden_ = model_->forward_hidden(batch_, cache_);
  // The sampling rows go through the LM head together: [sample rows, hidden] -> [sample rows, vocab].
  const size_t H = static_cast<size_t>(model_->config().hidden_size);
  const size_t V = static_cast<size_t>(model_->config().vocab_size);
  const size_t S = sample_rows_.size();
  sample_hidden_.resize(S * H);
  for (size_t s = 0; s < S; ++s)
    std::memcpy(sample_hidden_.data() + s * H, hidden_ + static_cast<size_t>(sample_rows_[s]) * H, H * sizeof(float));
  sample_logits_.resize(S * V);
  model_->lm_head(sample_hidden_.data(), static_cast<int>(S), sample_logits_.data());
}

void EngineCore::score_prompt_rows(const RowUse& u, const float* hidden) {
  Request& r = *u.req;
  const int V = model_->config().vocab_size;
  const size_t H = static_cast<size_t>(model_->config().hidden_size);
  const int slice = config_.prompt_logit_rows;
  for (int j0 = 0; j0 < u.prompt_rows; j0 += slice) {
    const int m = std::min(slice, u.prompt_rows - j0);
    // After a preemption the prompt is recomputed: rows already scored are skipped.
    const int first_pos = u.start + j0;
    if (first_pos + m <= static_cast<int>(r.prompt_logprobs.size())) continue;
    prompt_logits_.resize(static_cast<size_t>(m) * V);
    model_->lm_head(hidden + static_cast<size_t>(u.prompt_row + j0) * H, m, prompt_logits_.data());
    for (int j = 0; j < m; ++j) {
      const int pos = first_pos + j;
      if (pos != static_cast<int>(r.prompt_logprobs.size())) continue;
      r.prompt_logprobs.push_back(token_logprob(prompt_logits_.data() + static_cast<size_t>(j) * V, V,
                                                r.tokens[pos + 1], r.params.prompt_logprobs));
    }
  }
}

void EngineCore::accept() {
  accepted_.clear();
  const int V = model_->config().vocab_size;
  const auto& eos = config_.eos_token_ids;
  for (const RowUse& u : rows_) {
    Request& r = *u.req;
    try {
      faults_.check(Phase::accept, step_index_, r.id);
      if (u.prompt_rows > 0) score_prompt_rows(u, hidden_);
      Accepted a;
      a.req = &r;
      a.count = u.count;
      if (u.sample) {
        // Row j gives the token after draft j - 1 (row 0: after the last known token). Each is
        // drawn exactly as a plain decode would draw it (same penalties, same RNG draw); a draft
        // stands while it equals the token drawn in its place. For a deterministic draft that is
        // rejection sampling with q one-hot: kept with probability p(draft), and otherwise the
        // token comes from p without the draft; so the output, seeded or greedy, is the one
        // decoding without drafts gives.
        // A draft tree's leaves are alternatives at one depth: when the token drawn there is one
        // of them, that leaf is kept, its row gives the next token, and the walk ends.
        const auto& stops = r.params.stop_token_ids;
        int kept = 0;
        // Draws the idx-th token of this step from sample row `row` (offset from u.sample_row).
        auto draw = [&](int row, int idx) {
          TokenLogprob lp;
          const float* lg = sample_logits_.data() + static_cast<size_t>(u.sample_row + row) * V;
          // A grammar's mask is where its matcher stands now: after the tokens kept before this one.
          bool more = true;  // the grammar allows something besides EOS
          const uint32_t* allowed = r.grammar ? grammar_mask(*r.grammar, &more) : nullptr;
          // A complete grammar ends the choice even before min_tokens (masking EOS would leave nothing).
          const int generated = more ? r.num_generated + idx : std::max(r.params.min_tokens, r.num_generated + idx);
          const int32_t tok =
              sampler_.sample(lg, V, r.params, r.rng, r.history.get(), generated, eos, &lp, allowed);
          if (r.grammar && (!token_allowed(allowed, tok) || !r.grammar->consume(tok)))
            throw std::runtime_error("the grammar left no token to draw: " + r.grammar->error());
          a.tokens.push_back(tok);
          a.rows.push_back(row);
          if (r.history) r.history->add_generated(tok, V);  // the next row's penalties count it
          if (r.params.logprobs >= 0) a.logprobs.push_back(std::move(lp));
          if (std::find(stops.begin(), stops.end(), tok) != stops.end() ||
              (!r.params.ignore_eos && std::find(eos.begin(), eos.end(), tok) != eos.end()))
            a.reason = "stop";
          else if (r.grammar && r.grammar->stopped())
            a.reason = "stop";  // the grammar is complete: only EOS could follow
          else if ((r.params.max_tokens >= 0 && r.num_generated + idx + 1 >= r.params.max_tokens) ||
                   r.seq.num_tokens + idx + 1 >= context_limit())
            a.reason = "length";
          return tok;
        };
        for (int j = 0; j <= u.drafts; ++j) {
          const int32_t tok = draw(j, j);
          const bool draft_kept = j < u.drafts && tok == r.seq.drafts[j];
          int leaf = -1;
          for (int l = 0; l < u.leaves && !draft_kept && leaf < 0; ++l)
            if (r.seq.leaves[l].depth == j && r.seq.leaves[l].token == tok) leaf = l;
          if (draft_kept || leaf >= 0) {
            ++kept;
            ++counters_.spec_accepted_by_position[j];
          }
          if (leaf >= 0) {
            // The leaf's K/V moves to its depth's place in commit (it counts as computed, and may
            // enter the prefix cache, even when its token ends the request); unless its token
            // ended the request, its row draws the next token.
            ++counters_.spec_accepted_leaves;
            a.leaf_from = u.start + u.count + leaf;
            a.leaf_to = u.start + u.count - u.drafts + j;
            if (!a.reason) draw(u.drafts + 1 + leaf, j + 1);
            break;
          }
          if (a.reason || !draft_kept) break;
        }
        if (u.drafts > 0) {
          // K/V stands for the last known token and each kept draft; the rest is rolled back.
          a.count = u.count - u.drafts + kept;
          // What each tested draft teaches the automatic length: the first of a sequence's
          // (its own estimate, recent steps weighing most), the later ones of everyone's.
          r.spec_acceptance.update(kept > 0, 0.8);
          r.spec_untested = 0;
          for (int j = 1; j <= std::min(kept, u.drafts - 1); ++j) {
            spec_later_[static_cast<size_t>(j - 1)].update(j < kept, 0.99);  // tested: all before kept
          }
          ++counters_.spec_verifies;
          counters_.spec_draft_tokens += u.drafts + u.leaves;
          counters_.spec_accepted_tokens += kept;
        }
      }
      if (medusa_ || (draft_ && draft_->eagle())) keep_features(u, r, a.rows);
      accepted_.push_back(std::move(a));
    } catch (const std::exception& e) {
      ++counters_.step_failures;
      fail_request(r, std::string("engine fault while sampling: ") + e.what());
    }
  }
}

void EngineCore::keep_features(const RowUse& u, Request& r, const std::vector<int>& rows) {
  const size_t H = static_cast<size_t>(model_->config().hidden_size);
  // Bounds what a sequence that does not draft for a while holds (older rows read as zeros): at
  // most 1024 rows (2.4 MB at the default model's width).
  constexpr int kMaxFeatures = 1024;
  for (int i = 0; i < u.feature_rows; ++i)
    r.spec_features.put(u.start + i, hidden_ + static_cast<size_t>(u.feature_row + i) * H, H, kMaxFeatures);
  // Accepted token j was drawn at position first + j, by sample row rows[j].
  const int first = u.start + u.count - 1 - u.drafts;
  for (size_t j = 0; j < rows.size(); ++j)
    r.spec_features.put(first + static_cast<int>(j),
                        sample_hidden_.data() + static_cast<size_t>(u.sample_row + rows[j]) * H, H, kMaxFeatures);
  if (medusa_) r.spec_features.drop_before(r.spec_features.end() - 1);  // the heads read the latest only
}

const uint32_t* EngineCore::grammar_mask(GrammarMatcher& m, bool* more) {
  const auto t0 = std::chrono::steady_clock::now();
  grammar_mask_.resize(static_cast<size_t>(m.vocabulary().mask_words()));
  *more = m.fill_mask(grammar_mask_.data());
  ++counters_.grammar_masks;
  counters_.grammar_mask_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return grammar_mask_.data();
}

void EngineCore::commit() {
  for (Accepted& a : accepted_) {
    Request& r = *a.req;
    const int64_t key = r.seq.id;  // r may be gone by the time a fault is caught
    try {
      faults_.check(Phase::commit, step_index_, r.id);
      if (a.leaf_from >= 0) {  // a kept tree leaf's K/V to its place in the sequence
        const int ps = config_.page_size;
        auto slot = [&](int pos) { return static_cast<int64_t>(r.seq.pages.at(static_cast<size_t>(pos / ps))) * ps + pos % ps; };
        const ModelConfig& mc = model_->config();
        for (int l = 0; l < mc.num_layers; ++l)
          model_->backend().copy_kv_slot(mc.num_kv_heads, mc.head_dim, ps, slot(a.leaf_from), slot(a.leaf_to),
                                         cache_.k(l), cache_.v(l));
      }
      r.seq.num_computed += a.count;
      if (draft_ && draft_->eagle()) {
        // An EAGLE draft's K/V stands for the known tokens only (drafts were fed with the draft's
        // own features); the kept ones are caught up on with the target's.
        draft_->keep(r.seq.id, r.seq.num_tokens);
      } else if (draft_ && !r.seq.drafts.empty()) {
        // The draft fed back its drafts but the last: its K/V holds the known tokens and those,
        // and stands as far as the target kept them.
        const size_t fed = r.seq.drafts.size() - 1;
        size_t same = 0;
        while (same < fed && same < a.tokens.size() && a.tokens[same] == r.seq.drafts[same]) ++same;
        draft_->keep(r.seq.id, r.seq.num_tokens + static_cast<int>(same));
      }
      r.seq.drafts.clear();
      r.seq.leaves.clear();
      // Kept drafts are computed tokens: they join the tokens before the prefix cache reads them.
      // (accept counted every new token in the history already)
      r.tokens.insert(r.tokens.end(), a.tokens.begin(), a.tokens.end());
      scheduler_.computed(&r.seq);
      if (!r.prompt_logprobs_done && r.seq.num_computed >= r.num_prompt) r.prompt_logprobs_done = true;
      if (a.tokens.empty()) continue;
      if (r.params.n > 1 && !r.forked) fork(r);  // (children copy only the prompt)
      r.seq.num_tokens += static_cast<int>(a.tokens.size());
      r.num_generated += static_cast<int>(a.tokens.size());
      scheduler_.trim(&r.seq);  // pages only rejected drafts wrote
      counters_.tokens_generated += static_cast<int64_t>(a.tokens.size());
      EngineOutput& o = emit(r);
      o.tokens = std::move(a.tokens);
      o.logprobs = std::move(a.logprobs);
      if (r.params.prompt_logprobs >= 0 && r.index == 0 && !r.prompt_logprobs_sent) {
        o.has_prompt_logprobs = true;
        o.prompt_logprobs = std::move(r.prompt_logprobs);
        r.prompt_logprobs_sent = true;
      }
      if (a.reason) {
        end_choice(r.id, r.index, r.num_prompt, a.reason, {}, &o);
        release(r);
      }
    } catch (const std::exception& e) {
      ++counters_.step_failures;
      auto live = requests_.find(key);
      if (live != requests_.end())
        fail_request(*live->second, std::string("engine fault while committing a step: ") + e.what());
    }
  }
  accepted_.clear();
}

void EngineCore::fork(Request& parent) {
  // The other choices share every page that lies wholly before the one holding the last prompt
  // token, and recompute the rest themselves (< one page): no page is written by two sequences,
  // and their logits come out bit-identical to the parent's (the kernels are batch-invariant).
  const int ps = config_.page_size;
  const int shared_pages = (parent.num_prompt - 1) / ps;
  std::vector<Request*> children;
  try {
    for (int i = 1; i < parent.params.n; ++i) {
      if (!open_choices_.count(request_key(parent.id, i))) continue;  // aborted before it existed
      auto c = std::make_unique<Request>();
      c->id = parent.id;
      c->index = i;
      c->seq.id = request_key(parent.id, i);
      c->tokens.assign(parent.tokens.begin(), parent.tokens.begin() + parent.num_prompt);
      c->seq.tokens = &c->tokens;
      c->seq.num_cached_tokens = parent.seq.num_cached_tokens;
      c->num_prompt = parent.num_prompt;
      c->seq.num_tokens = parent.num_prompt;
      c->params = parent.params;
      c->prompt_logprobs_done = true;
      c->prompt_logprobs_sent = true;
      c->forked = true;  // only choice 0 forks
      if (parent.history) {
        c->history = std::make_unique<TokenHistory>();
        c->history->add_prompt(c->tokens, model_->config().vocab_size);
      }
      if (parent.params.grammar) c->grammar = parent.params.grammar->start();
      seed_rng(*c);
      Request* raw = c.get();
      requests_[raw->seq.id] = std::move(c);
      children.push_back(raw);
      scheduler_.fork(&parent.seq, &raw->seq, shared_pages);
    }
    // Front of the queue in index order.
    for (auto it = children.rbegin(); it != children.rend(); ++it) scheduler_.add_front(&(*it)->seq);
  } catch (...) {
    // Half a fork is no fork: the parent still stands for every choice.
    for (Request* c : children) release(*c);
    throw;
  }
  parent.forked = true;
}

EngineStats EngineCore::stats() const {
  EngineStats s = counters_;
  s.num_running = static_cast<int>(scheduler_.running().size());
  s.num_waiting = static_cast<int>(scheduler_.waiting().size());
  s.kv_pages_cached = prefix_cache_ ? static_cast<int>(prefix_cache_->cached_pages()) : 0;
  s.kv_pages_used = pool_.num_used() - s.kv_pages_cached;
  s.kv_pages_free = pool_.num_free();
  s.prefix_cache_nodes = prefix_cache_ ? prefix_cache_->tree().num_nodes() : 0;
  s.preemptions = scheduler_.num_preemptions();
  s.live_choices = static_cast<int>(open_choices_.size());
  s.step_index = step_index_;
  return s;
}

}  // namespace pyserve
